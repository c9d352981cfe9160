"""Interrupts at exact points of a streamed compression (benchmarks/interrupts.py, a few of its points): one
line, exit 128 + the signal, only the resumable folder left, and a resume to the uninterrupted run's bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "interrupts.py"


def test_interrupts_right_after_each_layer_and_the_rename_end_in_one_line_and_resume_exactly(tmp_path):
    rows_file = tmp_path / "rows.json"
    argv = [sys.executable, SCRIPT, "--layers", "2", "--events", "capture", "mark", "finish", "--timed", "0"]
    done = subprocess.run(
        [*argv, "--work", tmp_path / "work", "--json", rows_file], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(rows_file.read_text())
    assert [r["point"] for r in rows] == ["after capture #1", "after mark #1", "after mark #2", "after finish #1"]
    assert {r["signal"] for r in rows} == {"SIGINT", "SIGTERM", "SIGHUP"}
    assert all(r["verdict"] == "ok" and r["lines"] == 1 and not r["traceback"] for r in rows)
    assert [r["resumed_equal"] for r in rows] == [True, True, True, None]  # the last: the output was complete
    assert rows[-1]["message"].endswith("was already complete")
