"""Text sources, calibration windows (seeded offsets) and evaluation windows (consecutive)."""

from __future__ import annotations

import pytest
import torch

from svdkit import SvdkitError
from svdkit.sources.text import calibration_windows, eval_windows, load_text


def test_calibration_windows_follow_the_protocol_rule():
    ids = torch.arange(10_000)
    w = calibration_windows(ids, 8, 100, offset=5000, seed=0)
    starts = torch.randint(5000, 10_000 - 100, (8,), generator=torch.Generator().manual_seed(0))
    assert w.shape == (8, 100)
    assert torch.equal(w[:, 0], starts) and torch.equal(w[:, 1] - w[:, 0], torch.ones(8, dtype=torch.long))
    assert torch.equal(w, calibration_windows(ids, 8, 100, offset=5000, seed=0))
    assert not torch.equal(w, calibration_windows(ids, 8, 100, offset=5000, seed=1))
    assert int(w.min()) >= 5000 and int(w.max()) < 10_000


def test_eval_windows_are_consecutive_and_non_overlapping():
    ids = torch.arange(1000)
    w = eval_windows(ids, 128, offset=10)
    assert w.shape == (7, 128) and int(w[0, 0]) == 10 and int(w[1, 0]) == 138
    assert eval_windows(ids, 128, max_windows=2).shape == (2, 128)


def test_too_short_a_text_is_a_clear_error():
    with pytest.raises(SvdkitError, match="too short for one window of 2048"):
        eval_windows(torch.arange(100), 2048)
    with pytest.raises(SvdkitError, match="3 after offset 97"):
        calibration_windows(torch.arange(100), 4, 50, offset=97)


def test_text_sources(tmp_path):
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"one\r\ntwo\r\n")
    assert load_text(crlf) == "one\ntwo\n"
    assert "Assignment statements" in load_text("demo")
    with pytest.raises(SvdkitError, match="neither a file nor one of: wikitext2, ptb, c4, demo"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(SvdkitError, match="not UTF-8"):
        load_text(tmp_path / "bin.txt")


def test_named_sources_read_svdkit_data(shared_data, monkeypatch):
    monkeypatch.setenv("SVDKIT_DATA", str(shared_data))
    wiki = load_text("wikitext2")
    assert len(wiki.encode()) == 1_290_547 - wiki.count("\n")  # CRLF became LF
    assert load_text("ptb").startswith(" consumers may want")


def test_a_text_source_needs_a_tokenizer():
    from svdkit.sources.text import source_tokens

    with pytest.raises(SvdkitError, match="needs a tokenizer"):
        source_tokens(None, "demo")
