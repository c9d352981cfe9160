"""`svdkit methods`: every method and allocation with its options."""

from __future__ import annotations

from conftest import run_cli


def test_methods_are_listed(capsys):
    code, stdout, _ = run_cli(capsys, "methods")
    assert code == 0 and "svd-llm" in stdout and "svd " in stdout
    assert "alpha=0.5" in stdout and "k1_fraction=0.95" in stdout and "sensitivity" in stdout
