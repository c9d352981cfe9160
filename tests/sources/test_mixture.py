"""Calibration text mixtures (svdkit.sources.mixture): the spec grammar, good and bad; a mixture's windows are
each part's windows drawn alone, in spec order; a single source gives exactly the windows it always gave."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens

from svdkit.errors import SvdkitError
from svdkit.pipeline.options import CalibrationSettings
from svdkit.sources.mixture import Part, mixture_windows, parse_calib, parts_record
from svdkit.sources.text import calibration_windows, source_tokens


@pytest.mark.parametrize(
    "spec, parts",
    [
        ("wikitext2", [Part("wikitext2")]),
        ("demo:8", [Part("demo", 8)]),
        ("self", [Part("self")]),
        (
            "wikitext2:16, demo[:-32768]:8,self:4",
            [Part("wikitext2", 16), Part("demo", 8, None, -32768, True), Part("self", 4)],
        ),
        ("ptb[32768:]", [Part("ptb", None, 32768, None, True)]),
        ("c4[-5000:-100]:3,ptb[:]:2", [Part("c4", 3, -5000, -100, True), Part("ptb", 2, None, None, True)]),
    ],
)
def test_good_specs_parse(spec, parts):
    assert list(parse_calib(spec)) == parts
    assert ",".join(str(p) for p in parse_calib(spec)) == spec.replace(" ", "")  # a part prints as written


def test_a_file_part_and_a_file_whose_name_holds_separators(tmp_path):
    odd = tmp_path / "a:b,c[1:2].txt"
    odd.write_text("x")
    assert parse_calib(str(odd)) == (Part(str(odd)),)  # the whole spec is one existing file
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert parse_calib(f"{plain}[10:]:3,demo:1") == (Part(str(plain), 3, 10, None, True), Part("demo", 1))


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("nosuch", "text source 'nosuch' is neither a file nor one of: wikitext2, ptb, c4, demo, self"),
        ("/no/such/file.txt:4", "text source '/no/such/file.txt' is neither a file"),
        ("wikitext2:0", "N (its window count) must be a positive integer, got '0'"),
        ("wikitext2:-2", "must be a positive integer, got '-2'"),
        ("wikitext2:1.5", "must be a positive integer, got '1.5'"),
        ("wikitext2:", "must be a positive integer, got ''"),
        ("wikitext2:16,demo", "each gives its window count as SOURCE:N; 'demo' lack(s) one"),
        ("self[0:100]:4", "'self' is written by the model and takes no [START:END] slice"),
        ("wikitext2:16,,demo:8", "has an empty part"),
        ("wikitext2:16,", "has an empty part"),
        ("", "must be a non-empty string"),
        ("demo[a:]:4", "START must be an integer, got 'a'"),
        ("[0:10]:4", "names no source"),
    ],
)
def test_bad_specs_are_refused_in_one_line(spec, fragment):
    with pytest.raises(ValueError) as e:
        parse_calib(spec)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SvdkitError, match="^calibration: "):  # the options refuse it too, before any model
        CalibrationSettings(spec)


def test_the_sample_count_is_the_mixtures_sum_and_a_disagreeing_one_is_refused():
    assert CalibrationSettings("demo").samples == 32 and CalibrationSettings("demo", 5).samples == 5
    assert CalibrationSettings("demo:7").samples == 7
    assert CalibrationSettings("demo:7,ptb:5").samples == 12 == CalibrationSettings("demo:7,ptb:5", 12).samples
    with pytest.raises(SvdkitError, match="samples is 32, but the spec 'demo:7,ptb:5' gives 12 windows in all"):
        CalibrationSettings("demo:7,ptb:5", 32)


def test_a_mixtures_windows_are_each_part_drawn_alone_in_spec_order():
    wiki, ptb = torch.arange(5000), torch.arange(100_000, 103_000)  # a window's first token is its offset
    texts = {"wikitext2": wiki, "ptb": ptb}
    got = mixture_windows("wikitext2:3,ptb[100:2000]:4,wikitext2[-900:]:2", 9, 64, 50, 7, texts=texts)
    alone = [
        calibration_windows(wiki, 3, 64, 50, 7),
        calibration_windows(ptb[:2000], 4, 64, 100, 7),
        calibration_windows(wiki, 2, 64, 5000 - 900, 7),
    ]
    assert torch.equal(got, torch.cat(alone)) and got.shape == (9, 64)
    starts = got[:, 0].tolist()
    assert all(50 <= s < 5000 - 64 for s in starts[:3])  # unsliced: from the global offset
    assert all(100 <= s - 100_000 < 2000 - 64 for s in starts[3:7])  # inside its slice, never past its end
    assert all(4100 <= s < 5000 - 64 for s in starts[7:])


def test_a_single_source_gives_exactly_the_windows_it_always_gave(tiny_tokenizer, text_file):
    ids = random_tokens(3000, seed=3)
    before = calibration_windows(ids, 6, 40, 100, 5)  # what read_windows did before mixtures
    assert torch.equal(mixture_windows(ids, 6, 40, 100, 5), before)
    text = calibration_windows(source_tokens(tiny_tokenizer, text_file), 6, 40, 100, 5)
    assert torch.equal(mixture_windows(str(text_file), 6, 40, 100, 5, tiny_tokenizer), text)


def test_a_slice_too_short_for_one_window_is_refused():
    with pytest.raises(SvdkitError, match=r"'wikitext2\[100:150\]:2' spans tokens \[100, 150\) of the 5000"):
        mixture_windows("wikitext2[100:150]:2", 2, 64, texts={"wikitext2": torch.arange(5000)})


def test_the_record_keeps_each_parts_source_count_and_range():
    assert parts_record("wikitext2:3,ptb[100:-5]:4,self:2", 9, 50) == [
        {"source": "wikitext2", "windows": 3, "start": 50, "end": None},
        {"source": "ptb", "windows": 4, "start": 100, "end": -5},
        {"source": "self", "windows": 2, "start": None, "end": None, "generation": 1},
    ]
    record = CalibrationSettings("demo", 4, 32, 10).record()
    assert record["source"] == "demo" and record["parts"] == [
        {"source": "demo", "windows": 4, "start": 10, "end": None}
    ]
