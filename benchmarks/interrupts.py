"""Interrupts at any instant: a streamed ``svdkit compress`` stopped by SIGINT, SIGTERM or SIGHUP at many points
must end in one line (``svdkit: interrupted by SIG...``, exit 128 + the signal's number), leave nothing beside
the output but its resumable partial folder (or nothing at all, stopped before it wrote anything), and resume
(``--resume``) to the very bytes of an uninterrupted run.

    python benchmarks/interrupts.py [--layers 4] [--timed 12] [--work DIR] [--json FILE]

Two kinds of point, on a random-weight Llama of `--layers` layers built here (no download):

- **exact**: the signal is sent by the process to itself right after one of the walk's events, the n-th time
  it happens (a wrapper patches the event, then runs svdkit's command line): a layer's inputs captured, a
  layer loaded from the checkpoint, a layer's shard written, the state saved after a layer (``mark_done``), the
  hidden states saved, the folder renamed into place at the end (``finish``);
- **timed**: the signal is sent from outside at `--timed` instants spread over an uninterrupted run's length.

Prints one row per interrupt and a summary; tests/cli/test_interrupts.py runs a few of the exact points in CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EVENTS = {
    "capture": "svdkit.engine.capture:capture_layer_inputs",
    "load": "svdkit.pipeline.streaming:ReadLayers.load",
    "shard": "svdkit.pipeline.streaming:StreamedLayers.done",
    "mark": "svdkit.pipeline.partial:Partial.mark_done",
    "hidden": "svdkit.pipeline.partial:Partial.save_hidden",
    "finish": "svdkit.pipeline.partial:Partial.finish",
}
"""event -> where it happens (module:qualified name); the signal follows the call's return"""

WRAPPER = """
import importlib, os, sys
event, nth, signum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
module, _, name = event.partition(":")
owner = importlib.import_module(module)
*path, leaf = name.split(".")
for part in path:
    owner = getattr(owner, part)
real, seen = getattr(owner, leaf), [0]
def hooked(*args, **kwargs):
    result = real(*args, **kwargs)
    seen[0] += 1
    if seen[0] == nth:
        os.kill(os.getpid(), signum)
    return result
setattr(owner, leaf, hooked)
from svdkit.cli import main
sys.exit(main(sys.argv[4:]))
"""


@dataclass
class Row:
    point: str
    signal: str
    code: int
    lines: int
    message: str
    traceback: bool
    left: list[str]
    resumed_equal: bool | None
    verdict: str


def build(folder: Path, layers: int) -> None:
    """A random-weight Llama (hidden 64, GQA) and the bundled SmolLM2's tokenizer, saved to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from svdkit.sources.models import smollm2_folder

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained(folder)


def command(model: Path, out: Path) -> list[str]:
    return ["compress", str(model), "--calib", "demo", "--calib-samples", "4", "--calib-seqlen", "64",
            "--device", "cpu", "--output", str(out)]  # fmt: skip


def digests(folder: Path) -> dict[str, str]:
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def _default_signals() -> None:
    """In the child: SIGINT, SIGTERM and SIGHUP at their default actions, even where this script runs under
    nohup or in a background job (which ignore SIGHUP and SIGINT, and a child inherits that)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def _run(argv: list[str], env: dict, timed: float | None = None, signum: int = 0):
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_signals
    )
    if timed is not None:
        try:
            proc.wait(timeout=timed)
        except subprocess.TimeoutExpired:
            proc.send_signal(signum)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def check(point: str, signum: int, result, case: Path, reference: dict, env: dict, model: Path) -> Row:
    """Judge one interrupted run: one line and 128 + the signal (or 0 where the run ended first), and either the
    resumable folder alone (then resumed and compared with the uninterrupted output), the complete output, or
    nothing at all (stopped before it wrote anything)."""
    code, out, err = result
    lines = [ln for ln in err.splitlines() if ln.startswith("svdkit:") or "Traceback" in ln or "Error" in ln]
    left = sorted(p.name for p in case.iterdir() if p.name != "out")
    expect = f"svdkit: interrupted by {signal.Signals(signum).name}"
    one_line = code == 0 or (len(lines) == 1 and lines[0].startswith(expect) and code == 128 + signum)
    complete = (case / "out").is_dir() and digests(case / "out") == reference
    equal = None
    if left == [".out.svdkit-partial"] and not (case / "out").exists():
        rc, _, rerr = _run([sys.executable, "-m", "svdkit", *command(model, case / "out"), "--resume"], env)
        equal = rc == 0 and digests(case / "out") == reference and [p.name for p in case.iterdir()] == ["out"]
    nothing = left == [] and not (case / "out").exists()  # stopped before it wrote anything: nothing to resume
    good = one_line and "Traceback" not in err and (equal or (left == [] and complete) or nothing)
    message = lines[-1] if lines else (out.strip().splitlines() or [""])[0]
    return Row(point, signal.Signals(signum).name, code, len(lines), message[:300], "Traceback" in err, left, equal,
               "ok" if good else "FAIL")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--timed", type=int, default=12, help="interrupts at instants spread over a run")
    p.add_argument("--events", nargs="*", default=list(EVENTS), choices=list(EVENTS))
    p.add_argument("--work", type=Path, default=None, help="where to build and run (a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="svdkit-interrupts-"))
    model = work / "model"
    if not model.is_dir():
        build(model, a.layers)
    env = {**os.environ, "TMPDIR": str(work)}
    t = time.perf_counter()
    reference_dir = work / "reference"
    code, _, err = _run([sys.executable, "-m", "svdkit", *command(model, reference_dir / "out")], env)
    if code:
        print(err, file=sys.stderr)
        return 2
    length, reference = time.perf_counter() - t, digests(reference_dir / "out")
    counts = {"capture": 1, "load": a.layers, "shard": a.layers, "mark": a.layers, "hidden": a.layers, "finish": 1}
    rows: list[Row] = []
    n = 0
    for event in a.events:
        for nth in range(1, counts[event] + 1):
            signum = SIGNALS[n % len(SIGNALS)]
            n += 1
            case = work / f"case-{n}"
            case.mkdir()
            argv = [sys.executable, "-c", WRAPPER, EVENTS[event], str(nth), str(int(signum)),
                    *command(model, case / "out")]  # fmt: skip
            rows.append(check(f"after {event} #{nth}", signum, _run(argv, env), case, reference, env, model))
            print(_row(rows[-1]), flush=True)
    for i in range(a.timed):
        signum = SIGNALS[n % len(SIGNALS)]
        n += 1
        case = work / f"case-{n}"
        case.mkdir()
        at = length * (i + 0.5) / a.timed
        argv = [sys.executable, "-m", "svdkit", *command(model, case / "out")]
        rows.append(check(f"at {at:.1f} s", signum, _run(argv, env, at, signum), case, reference, env, model))
        print(_row(rows[-1]), flush=True)
    failed = [r for r in rows if r.verdict != "ok"]
    print(f"\n{len(rows)} interrupts ({length:.1f} s a run uninterrupted): {len(rows) - len(failed)} ok, "
          f"{len(failed)} failed, {sum(r.traceback for r in rows)} with a traceback")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 1 if failed else 0


def _row(r: Row) -> str:
    resumed = {None: "—", True: "equal", False: "DIFFERS"}[r.resumed_equal]
    return f"| {r.point} | {r.signal} | {r.code} | {r.message} | {', '.join(r.left) or '—'} | {resumed} | {r.verdict} |"


if __name__ == "__main__":
    sys.exit(main())
