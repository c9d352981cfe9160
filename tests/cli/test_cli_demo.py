"""`svdkit demo`: it never replaces a folder it did not write."""

from __future__ import annotations

import pytest


def test_demo_refuses_to_replace_a_foreign_folder(tmp_path):
    from svdkit import SvdkitError
    from svdkit.cli.demo import run_demo

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a model")
    with pytest.raises(SvdkitError, match="exists and is not empty"):
        run_demo(output=str(out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
