"""The fault cases of issue 18, end to end on the real SmolLM2-135M through the command line.

    python benchmarks/faults.py [--cases 1 2 ... 11] [--work DIR] [--keep] [--good DIR] [--timeout 900]

Every case runs ``python -m svdkit.cli ...`` (this interpreter's svdkit) in subprocesses, in a fresh folder
of its own that is also the subprocesses' working directory and holds their TMPDIR (so what a run leaves
in "the system's temporary folder" shows too). A plain ``compress smollm2-135m`` streams layer by layer:
it keeps its work in a hidden ``.out.svdkit-partial`` folder beside the output, one shard per finished
layer, and writes no ``.out.tmp-*`` folder. The runs that must load the whole model, spill every layer's
statistics (to --statistics-dir, else TMPDIR) and save at once through a hidden ``.out.tmp-*`` folder use
the sensitivity allocation, made cheap (one window of 16 tokens, a grid of two fractions, its table kept
in the case folder): "sensitivity" in the labels. Cases:

 1. SIGINT and 2. SIGTERM during the calibration of a streamed run (once a layer is calibrated): the
    partial folder is kept for a resume; then the same command with ``--resume``, which must finish it
    and leave nothing hidden behind;
 3. kill -9 during a sensitivity run with --statistics-dir (once a layer is spilled), then a complete run
    with the same statistics folder: it must sweep the dead run's spill (its output serves cases 5-10);
 4. SIGTERM and 5. kill -9 during the save of a sensitivity run (once the weights file in the hidden
    ``.out.tmp-*`` folder is non-empty), then a run into another folder of the same parent and one into
    the same output (``densify``): the latter must sweep the dead run's folder;
 6. a 100 MB tmpfs: compress into it, densify into it, spill a sensitivity run's statistics onto it (all
    refused up front);
 7. a tmpfs between the size the up-front check estimates (read from case 6's message) and the real
    output's size, so that writing the output itself runs out of space (a streamed run: while writing a
    layer's shard); and a sensitivity run's statistics folder on a tmpfs 5% larger than the spill the
    check asks for (the check's figure is a lower bound);
 8. a read-only tmpfs as output and as a sensitivity run's statistics folder;
 9. a copy of a good folder with its (largest) weights file truncated, and one whose record lost a rank:
    eval, info, densify;
10. the good folder loaded without svdkit (``sys.modules["svdkit"] = None``): plain ``from_pretrained``,
    then ``trust_remote_code=True``, compared with ``svdkit.load``;
11. kill -9 during a streamed run once its partial folder records a finished layer (``state.json``), then
    the same command with ``--resume``, and the same command uninterrupted into another folder: the sha256
    of every file of the two outputs compared (a row of its own).

Prints one markdown row per run: the exit code (a negative one: killed by that signal), the last line
on standard error that is not a progress bar (the message; where there is none, the first standard output
line, a successful command's summary) and what is on disk afterwards that was not there before the case:
every new entry of the case folder, of its TMPDIR, of the statistics folder and of the mounted tmpfs
("nothing" when none; torch's own ``torchinductor_*`` cache folder in TMPDIR and the sensitivity table
the runs are told to keep are not counted). A case's later runs count from the same baseline as its first
(case 7's from each mount), so a resumed run's row shows what the whole case left. Mounting a tmpfs needs
root; where mounting fails the row says "skipped" and why. Nothing in the table is expected in advance:
every cell is observed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CALIB = ["--calib", "demo", "--calib-samples", "8", "--calib-seqlen", "256", "--method", "svd-llm", "--ratio", "0.4"]
COMPRESS = ["compress", "smollm2-135m", *CALIB]
PROGRESS = re.compile(r"^(?P<desc>[^\r\n]*?):\s+\d+%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)")
NEEDS = re.compile(r"needs about ([\d.]+) (MB|GB)")
SPILL_MARGIN = 0.05
"""case 7's statistics tmpfs: this much above the spill size the up-front check asks for"""
TORCH_CACHE = "torchinductor_"
"""torch's compile cache, an empty folder that importing torch may make in TMPDIR: not counted"""
SENSITIVITY_TABLE = "sensitivity.json"
"""the sensitivity runs' table (``cache=``), in the case folder: asked for, so not counted"""
PARTIAL = ".svdkit-partial"
"""suffix of the hidden folder beside the output where a streamed run keeps its finished layers"""
USES_GOOD = range(5, 11)
"""the cases that start from a good compressed folder"""
TEXT = "The Python tutorial introduces the reader informally to the basic concepts and features of the language."


@dataclass
class Row:
    """One run's line of the table."""

    case: str
    run: str
    signal: str = ""
    exit: str = ""
    seconds: str = ""
    message: str = ""
    left: str = ""

    def markdown(self) -> str:
        cells = [self.case, self.run, self.signal, self.exit, self.seconds, self.message, self.left]
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


@dataclass
class Case:
    """A fresh folder for one case: the runs' working directory, with their TMPDIR inside; `watched` are the
    folders whose new entries count as left on disk."""

    number: int
    root: Path
    python: str
    timeout: float
    names: dict[str, str] = field(default_factory=dict)
    """paths written as names in the messages (the case folder as '.', the good folder as GOOD)"""
    watched: list[Path] = field(default_factory=list)
    baseline: set[Path] = field(default_factory=set)
    runs: int = 0

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def watch(self, *folders: Path) -> None:
        """Watch these folders too (made if missing), and take the baseline of every watched folder now."""
        for f in (self.tmp, *folders):
            f.mkdir(parents=True, exist_ok=True)
        self.watched = list(dict.fromkeys([self.root, self.tmp, *self.watched, *folders]))
        self.baseline = entries(self.watched)

    def start(self, args: list[str], module: bool = True) -> tuple[subprocess.Popen, Path, Path]:
        """Start ``python -m svdkit.cli ARGS`` (or ``python ARGS``) with standard output and error to files."""
        self.runs += 1
        logs = self.root.parent / "logs"
        logs.mkdir(exist_ok=True)
        out, err = (logs / f"{self.number:02d}-{self.runs}.{s}" for s in ("out", "err"))
        env = {
            **os.environ,
            "TMPDIR": str(self.tmp),
            "HF_HUB_OFFLINE": "1",
            "HF_MODULES_CACHE": str(self.root.parent / "hf-modules"),
        }
        cmd = [self.python, "-m", "svdkit.cli", *args] if module else [self.python, *args]
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=o, stderr=e, preexec_fn=_default_signals)
        return proc, out, err


def _default_signals() -> None:
    """In the child: SIGINT, SIGTERM, SIGHUP at their default action (a parent in the background may ignore
    them, and an ignored signal stays ignored across exec)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def entries(folders: list[Path]) -> set[Path]:
    """The entries directly inside each folder (hidden ones included)."""
    found: set[Path] = set()
    for f in folders:
        if f.is_dir():
            found.update(f.iterdir())
    return found


def human(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} B"


def describe(path: Path, root: Path) -> str:
    """`path` relative to `root`, with its file count and size."""
    rel = path.relative_to(root)
    if path.is_dir() and not path.is_symlink():
        files = [f for f in path.rglob("*") if f.is_file()]
        return f"{rel}/ ({len(files)} files, {human(sum(f.stat().st_size for f in files))})"
    return f"{rel} ({human(path.lstat().st_size)})"


def left_on_disk(case: Case) -> str:
    new = entries(case.watched) - case.baseline - set(case.watched)
    new = {p for p in new if not p.name.startswith(TORCH_CACHE) and p != case.root / SENSITIVITY_TABLE}
    return "; ".join(describe(p, case.root) for p in sorted(new)) or "nothing"


def last_line(err: str, out: str) -> str:
    """The last non-empty line of `err` that is not a progress bar, else the first of `out` (a successful
    command's summary); notes a traceback."""
    lines = [s.strip() for s in re.split(r"[\r\n]+", err) if s.strip() and not PROGRESS.match(s.strip())]
    if lines:
        message = lines[-1]
    else:
        outs = [s.strip() for s in out.splitlines() if s.strip()]
        message = f"(stdout) {outs[0]}" if outs else "(none)"
    if "Traceback (most recent call last)" in err:
        message += " [TRACEBACK on stderr]"
    return message[:400]


def progress_at(err: str) -> str:
    """Where the last progress bar of `err` stood, e.g. 'calibrating layers 3/30'."""
    bars = [m for s in re.split(r"[\r\n]+", err) if (m := PROGRESS.match(s.strip()))]
    return f"{bars[-1]['desc']} {bars[-1]['done']}/{bars[-1]['total']}" if bars else "no progress bar yet"


def exit_text(rc: int | None) -> str:
    if rc is None:
        return "timed out"
    return f"{rc} ({signal.Signals(-rc).name})" if rc < 0 else str(rc)


def run(
    case: Case,
    label: str,
    args: list[str],
    send: signal.Signals | None = None,
    ready: Callable[[str], str | None] | None = None,
    module: bool = True,
) -> Row:
    """Run the command; with `send`, send that signal once `ready(stderr so far)` returns a note (where the
    run stood) and time how long the process took to end after it. The row holds what was observed, with
    the case folder's path taken out of the message."""
    t = time.perf_counter()
    proc, out, err = case.start(args, module)
    sent, at = _signal_when_ready(proc, err, send, ready, t + case.timeout) if send else ("", None)
    try:
        rc: int | None = proc.wait(timeout=max(1.0, t + case.timeout - time.perf_counter()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    seconds = time.perf_counter() - t
    if at is not None:
        sent += f"; ended {time.perf_counter() - at:.1f} s later"
    message = last_line(err.read_text(errors="replace"), out.read_text(errors="replace"))
    for path, name in {**case.names, f"{case.root}/": "", str(case.root): ".", str(case.root.parent): "WORK"}.items():
        message = message.replace(path, name)
    return Row(f"{case.number}", label, sent, exit_text(rc), f"{seconds:.0f}", message, left_on_disk(case))


def _signal_when_ready(proc, err: Path, send: signal.Signals, ready, deadline: float) -> tuple[str, float | None]:
    """Poll until `ready` gives a note, then send: (what was done, when it was sent)."""
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            return f"not sent: the run ended first ({send.name})", None
        note = ready(err.read_text(errors="replace"))
        if note:
            proc.send_signal(send)
            return f"{send.name} at {note}", time.perf_counter()
        time.sleep(0.005)
    return f"not sent: not ready within the time limit ({send.name})", None


def calibrating(err: str) -> str | None:
    """Ready once at least one layer is calibrated."""
    where = progress_at(err)
    m = re.match(r"calibrating layers (\d+)/", where)
    return where if m and int(m[1]) >= 1 else None


def spilled(stats: Path) -> Callable[[str], str | None]:
    """Ready once a statistics spill folder in `stats` holds a layer file."""

    def ready(err: str) -> str | None:
        files = list(stats.glob("svdkit-stats-*/layer-*.safetensors"))
        return f"{progress_at(err)}, {len(files)} layer file(s) spilled" if files else None

    return ready


def layer_finished(partial: Path) -> Callable[[str], str | None]:
    """Ready once a streamed run's partial folder records a finished layer (``layers_done`` >= 1 in its
    ``state.json``)."""

    def ready(err: str) -> str | None:
        try:
            done = json.loads((partial / "state.json").read_text())["layers_done"]
        except (OSError, ValueError, KeyError):
            return None
        return f"{progress_at(err)}, {partial.name}/state.json layers_done {done}" if done >= 1 else None

    return ready


def saving(parent: Path, name: str) -> Callable[[str], str | None]:
    """Ready once the weights are being written: a non-empty ``*.safetensors`` in the staged output inside a
    hidden ``.NAME.tmp-*`` folder."""

    def ready(err: str) -> str | None:
        for weights in parent.glob(f".{name}.tmp-*/{name}/*.safetensors"):
            size = weights.stat().st_size if weights.exists() else 0
            if size:
                return f"saving ({weights.relative_to(parent)} at {human(size)})"
        return None

    return ready


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[str | None]:
    """Mount a tmpfs at `path` for the block; yields None, or why it could not be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield "not root: mounting a tmpfs needs root"
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        yield f"mount -t tmpfs -o {options} failed: {(r.stderr or r.stdout).strip() or r.returncode}"
        return
    try:
        yield None
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def skipped(case: Case, label: str, reason: str) -> Row:
    return Row(f"{case.number}", label, "", "—", "", f"skipped: {reason}", "")


# ---- the cases -----------------------------------------------------------------------------------------------


def whole(case: Case) -> list[str]:
    """Flags of a run that loads the model whole, spills every layer's statistics (to --statistics-dir, else
    TMPDIR) and saves at once through a hidden ``.NAME.tmp-*`` folder: the sensitivity allocation, made cheap
    (one window of 16 tokens, two grid fractions), its table in the case folder."""
    options = ["windows=1", "seqlen=16", "grid=[0.3,0.6]", f"cache={case.root / SENSITIVITY_TABLE}"]
    return ["--allocation", "sensitivity", *[x for o in options for x in ("--allocation-option", o)]]


def signals_calibrating(case: Case, send: signal.Signals) -> list[Row]:
    """A streamed run interrupted while it calibrates (its partial folder kept), then resumed."""
    case.watch()
    args = [*COMPRESS, "--output", "out"]
    return [
        run(case, "compress → out (streamed)", args, send, calibrating),
        run(case, "the same with --resume → out", [*args, "--resume"]),
    ]


def killed_spill(case: Case) -> list[Row]:
    stats = case.root / "stats"
    case.watch(stats)
    spill = [*COMPRESS, *whole(case), "--statistics-dir", "stats"]
    return [
        run(case, "compress sensitivity --statistics-dir stats → out", [*spill, "--output", "out"],
            signal.SIGKILL, spilled(stats)),
        run(case, "the same again → good (the next run, same statistics folder)", [*spill, "--output", "good"]),
    ]  # fmt: skip


def signal_saving(case: Case, send: signal.Signals, good: Path) -> list[Row]:
    case.watch()
    args = [*COMPRESS, *whole(case), "--output", "out"]
    rows = [run(case, "compress sensitivity → out", args, send, saving(case.root, "out"))]
    if send == signal.SIGKILL:
        rows += [
            run(
                case,
                "densify GOOD --output other (same parent, other name)",
                ["densify", str(good), "--output", "other"],
            ),
            run(case, "densify GOOD --output out (the next run into out)", ["densify", str(good), "--output", "out"]),
        ]
    return rows


def disk_full(case: Case, good: Path) -> list[Row]:
    return _three_writers(case, good, "mnt", "size=100m", "100 MB tmpfs")


def _three_writers(case: Case, good: Path, folder: str, options: str, what: str) -> list[Row]:
    """compress, densify and a statistics spill aimed at a tmpfs mounted with `options` at `folder`."""
    mnt = case.root / folder
    labels = [f"compress → {what}", f"densify GOOD → {what}", f"compress sensitivity, --statistics-dir {what}"]
    with tmpfs(mnt, options) as why:
        if why:
            return [skipped(case, label, why) for label in labels]
        case.watch(mnt)
        commands = [
            [*COMPRESS, "--output", f"{folder}/out"],
            ["densify", str(good), "--output", f"{folder}/dense"],
            [*COMPRESS, *whole(case), "--statistics-dir", folder, "--output", "out"],
        ]
        return [run(case, label, cmd) for label, cmd in zip(labels, commands, strict=True)]


def unforeseen_full(case: Case, good: Path, estimates: dict[str, int]) -> list[Row]:
    """Disks that pass the up-front checks but are too small: for the output, a tmpfs halfway between the
    estimate (case 6's refusal) and the real size (the good folder); for the statistics spill, a tmpfs
    SPILL_MARGIN above the estimate."""
    rows = []
    real = sum(f.stat().st_size for f in good.rglob("*") if f.is_file())
    estimate = estimates.get("output")
    label = "compress → tmpfs between the output estimate and the real size"
    if estimate is None:
        rows.append(skipped(case, label, "no size estimate: case 6's compress did not report one"))
    elif estimate >= real:
        rows.append(skipped(case, label, f"the estimate {human(estimate)} is not below the real size {human(real)}"))
    else:
        size = (estimate + real) // 2
        label = f"compress → {human(size)} tmpfs (output estimate {human(estimate)}, real {human(real)})"
        rows.append(on_tmpfs(case, "mnt", size, label, [*COMPRESS, "--output", "mnt/out"]))
    estimate = estimates.get("statistics")
    label = "compress sensitivity, --statistics-dir tmpfs just above the spill estimate"
    if estimate is None:
        return [*rows, skipped(case, label, "no spill estimate: case 6's --statistics-dir run did not report one")]
    size = int(estimate * (1 + SPILL_MARGIN))
    label = f"compress sensitivity, --statistics-dir {human(size)} tmpfs (spill estimate {human(estimate)})"
    spill = [*COMPRESS, *whole(case), "--statistics-dir", "spill", "--output", "out"]
    return [*rows, on_tmpfs(case, "spill", size, label, spill)]


def on_tmpfs(case: Case, folder: str, size: int, label: str, args: list[str]) -> Row:
    """One run with a tmpfs of `size` bytes mounted at `folder` of the case."""
    mnt = case.root / folder
    with tmpfs(mnt, f"size={size // 1024}k") as why:
        if why:
            return skipped(case, label, why)
        case.watch(mnt)
        return run(case, label, args)


def read_only(case: Case, good: Path) -> list[Row]:
    return _three_writers(case, good, "ro", "ro,size=1m", "read-only tmpfs")


def corrupt(case: Case, good: Path) -> list[Row]:
    """A copy with its largest weights file (one file, or a shard of a streamed run) cut to half its bytes,
    and a copy whose record lost one rank."""
    truncated, lost = case.root / "truncated", case.root / "lost-rank"
    shutil.copytree(good, truncated)
    weights = max(truncated.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    os.truncate(weights, weights.stat().st_size // 2)
    shutil.copytree(good, lost)
    config = json.loads((lost / "config.json").read_text())
    gone = sorted(config["svdkit"]["ranks"])[0]
    del config["svdkit"]["ranks"][gone]
    (lost / "config.json").write_text(json.dumps(config, indent=2))
    case.watch()
    rows = []
    for folder, what in ((truncated, f"{weights.name} truncated to half"), (lost, f"record lost the rank of {gone}")):
        name = folder.name
        rows += [
            run(case, f"eval {name} ({what})", ["eval", name, "--dataset", "demo", "--max-windows", "1"]),
            run(case, f"info {name}", ["info", name]),
            run(case, f"densify {name} --output dense-{name}", ["densify", name, "--output", f"dense-{name}"]),
        ]
    return rows


WITHOUT_SVDKIT = """
import sys
sys.modules["svdkit"] = None  # `import svdkit` fails from here on, as where svdkit is not installed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, trust, out, text = sys.argv[1], sys.argv[2] == "trust", sys.argv[3], sys.argv[4]
try:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust)
except Exception as e:
    print(f"refused: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr)
    sys.exit(1)
ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt").input_ids
with torch.no_grad():
    torch.save({"ids": ids, "logits": model(ids).logits[0]}, out)
print(f"loaded {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters", file=sys.stderr)
"""

WITH_SVDKIT = """
import sys
import torch
import svdkit
model, _ = svdkit.load(sys.argv[1])
ref = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ref["ids"]).logits[0]
same = int((logits.argmax(-1) == ref["logits"].argmax(-1)).sum())
diff = (logits - ref["logits"]).abs().max().item()
params = sum(p.numel() for p in model.parameters())
print(f"svdkit.load: {params:,} parameters; same top token for {same}/{len(logits)} positions as "
      f"trust_remote_code=True without svdkit, max |logit difference| {diff:.2e}", file=sys.stderr)
"""


def portable(case: Case, good: Path) -> list[Row]:
    case.watch()
    logits = case.root.parent / "portable-logits.pt"  # outside the case folder: not a leftover
    plain, trusted = (["-c", WITHOUT_SVDKIT, str(good), t, str(logits), TEXT] for t in ("plain", "trust"))
    return [
        run(case, "from_pretrained(GOOD), svdkit not importable", plain, module=False),
        run(case, "from_pretrained(GOOD, trust_remote_code=True), svdkit not importable", trusted, module=False),
        run(case, "svdkit.load(GOOD), same input", ["-c", WITH_SVDKIT, str(good), str(logits)], module=False),
    ]


def killed_streamed(case: Case) -> list[Row]:
    """kill -9 once a streamed run has finished a layer, --resume, and the same command uninterrupted into
    another folder; the two outputs compared file by file."""
    case.watch()
    args = [*COMPRESS, "--output", "out"]
    rows = [
        run(case, "compress → out (streamed)", args, signal.SIGKILL, layer_finished(case.root / f".out{PARTIAL}")),
        run(case, "the same with --resume → out", [*args, "--resume"]),
        run(case, "the same, uninterrupted → ref", [*COMPRESS, "--output", "ref"]),
    ]
    return [*rows, compare(case, case.root / "out", case.root / "ref")]


def compare(case: Case, a: Path, b: Path) -> Row:
    """A row saying whether every file of folders `a` and `b` has the same sha256 (and which differ)."""
    label = f"sha256 of every file: {a.name} (resumed) vs {b.name} (uninterrupted)"
    missing = [f.name for f in (a, b) if not f.is_dir()]
    if missing:
        return Row(f"{case.number}", label, "", "—", "", f"not compared: no folder {', '.join(missing)}", "")
    ours, theirs = digests(a), digests(b)
    if ours == theirs:
        return Row(f"{case.number}", label, "", "—", "", f"equal: all {len(ours)} files the same", "")
    differ = [n for n in sorted(ours.keys() | theirs.keys()) if ours.get(n) != theirs.get(n)]
    where = [n if n in ours and n in theirs else f"{n} (only in {a.name if n in ours else b.name})" for n in differ]
    message = f"differ: {len(differ)} of {len(ours.keys() | theirs.keys())} files: {', '.join(where)}"
    return Row(f"{case.number}", label, "", "—", "", message, "")


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by its path relative to it."""
    found = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(f, "rb") as r:
            found[str(f.relative_to(folder))] = hashlib.file_digest(r, "sha256").hexdigest()
    return found


# ---- the driver ----------------------------------------------------------------------------------------------


def estimates_from(rows: list[Row]) -> dict[str, int]:
    """The sizes the up-front checks asked for ('needs about N MB'): for the output and for the statistics."""
    found = {}
    for row in rows:
        if m := NEEDS.search(row.message):
            what = "statistics" if "statistics" in row.message else "output"
            found.setdefault(what, int(float(m[1]) * (2**30 if m[2] == "GB" else 2**20)))
    return found


def cases(a: argparse.Namespace, work: Path) -> Iterator[Row]:
    """Run the chosen cases in order, yielding rows as they come."""
    good = Path(a.good).absolute() if a.good else None
    estimates: dict[str, int] = {}
    for n in sorted(set(a.cases)):
        case = Case(n, work / f"case-{n:02d}", a.python, a.timeout)
        case.root.mkdir()
        if n in USES_GOOD and good is None:  # case 3 did not run: make the good folder
            setup = Case(0, work / "case-00", a.python, a.timeout)
            setup.root.mkdir()
            setup.watch()
            yield run(setup, "compress → good (the folder cases 5-10 use)", [*COMPRESS, "--output", "good"])
            good = setup.root / "good"
        if good is not None:
            case.names[str(good)] = "GOOD"
        rows = one_case(n, case, good, estimates)
        estimates = {**estimates_from(rows), **estimates}
        if n == 3 and good is None:
            good = case.root / "good"
        yield from rows


def one_case(n: int, case: Case, good: Path | None, estimates: dict[str, int]) -> list[Row]:
    table: dict[int, Callable[[], list[Row]]] = {
        1: lambda: signals_calibrating(case, signal.SIGINT),
        2: lambda: signals_calibrating(case, signal.SIGTERM),
        3: lambda: killed_spill(case),
        4: lambda: signal_saving(case, signal.SIGTERM, good),
        5: lambda: signal_saving(case, signal.SIGKILL, good),
        6: lambda: disk_full(case, good),
        7: lambda: unforeseen_full(case, good, estimates),
        8: lambda: read_only(case, good),
        9: lambda: corrupt(case, good),
        10: lambda: portable(case, good),
        11: lambda: killed_streamed(case),
    }
    return table[n]()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, nargs="+", default=list(range(1, 12)), choices=range(1, 12), metavar="N")
    p.add_argument("--work", help="folder for the cases (default: a new temporary folder, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs in WORK/logs)")
    p.add_argument("--good", help="a compressed folder of SmolLM2 at 0.4 for cases 5-10 (default: made by case 3)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take (900)")
    p.add_argument("--python", default=sys.executable, help="the interpreter with svdkit (this one)")
    a = p.parse_args()
    if a.good and not (Path(a.good) / "config.json").is_file():
        p.error(f"--good {a.good}: not a saved model folder")
    work = Path(a.work).absolute() if a.work else Path(tempfile.mkdtemp(prefix="svdkit-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"cases in {work}; GOOD is the compressed folder cases 5-10 start from\n", flush=True)
    print("| case | run | signal sent | exit | s | message (last stderr line) | left on disk |")
    print("|---|---|---|---|---|---|---|", flush=True)
    try:
        for row in cases(a, work):
            print(row.markdown(), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nwall time {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
