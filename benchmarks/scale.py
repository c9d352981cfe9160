"""How `svdkit compress` scales with depth and width: memory, time and disk on synthetic Llama checkpoints.

    python benchmarks/scale.py [--models 1b-d5 1b-d20 8b-d2] [--nproc 2 [--nproc-models 8b-d2]]
                               [--work bench-output/scale]
                               [--calib-samples 4] [--calib-seqlen 512] [--extra "--method svd-llm ..."]

Builds random-weight LlamaForCausalLM checkpoints of real shapes (Llama-3.2-1B at 4, 5, 16 and 20 layers,
Llama-3.1-8B at 2, 8 and 32 layers; tiny ones for a smoke test) without ever holding a whole model: every
tensor is drawn in bfloat16 (normal, std 0.02; norms ones; a fixed seed per tensor name; on CUDA where
present, --build-device) and written with safetensors, one shard per decoder layer, one for the embeddings
and one for the final norm and lm_head, beside model.safetensors.index.json, config.json and the bundled
SmolLM2's tokenizer (or --tokenizer's; its ids stay below every preset's vocabulary). The tensor names
and shapes are those of LlamaForCausalLM's state_dict (taken from the model built on the meta device;
lm_head.weight left out where tied). Checkpoints are cached in
WORK/models and rebuilt only when missing or built from another preset; presets of under 1 GB in float32
are loaded once with AutoModelForCausalLM.from_pretrained, which must report no missing or unexpected
tensor and give finite logits.

Each model is then compressed by ``python -m svdkit compress MODEL EXTRA --calib-samples S --calib-seqlen L
--statistics-dir WORK/runs/RUN/stats --output WORK/runs/RUN/out --overwrite --json`` in a subprocess
(EXTRA: --extra, by default ``--method svd-llm --ratio 0.4 --dtype bfloat16 --calib demo``), and with
--nproc N > 1 once more (only the presets of --nproc-models, when given) through ``torchrun --standalone
--nproc-per-node N -m svdkit compress ...`` with OMP_NUM_THREADS = cores / N per process (unless
OMP_NUM_THREADS is set). Measured per run:

- wall time of the process, and wall time / decoder layers;
- peak RSS from the OS: the kernel's high-water mark (VmHWM) of every process of the tree, read every
  0.1 s, and the ``ru_maxrss`` that wait4 returns for the tree; the table shows the largest single
  process (for torchrun: the largest of any worker or torchrun itself); scale.json also holds the
  largest sampled sum over the tree and the largest sampled anonymous (non-file) RSS;
- the disk under --statistics-dir (largest size seen while polling) and under the partial folder that a
  streamed run keeps beside its output (scale.json);
- the output folder's size, and whether ``svdkit info OUT --json`` exits 0;
- where it ran and, on CUDA, the peak GPU memory PyTorch allocated (the command's JSON summary).

Prints one markdown row per run and the goal checks (the deeper of two same-width models within 15% of
the shallower one's peak RSS; its peak RSS at most half its float32 size; seconds per layer within 25%
across depth; N processes not slower than one), and writes the rows to WORK/scale.json. Logs of every
run are in WORK/runs/RUN/. GB here is 10^9 bytes. Before compressing, every flag of the command must
be listed by ``svdkit compress --help``; otherwise the checkpoints are still built and the script stops
with one line saying which flag is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

EXTRA = "--method svd-llm --ratio 0.4 --dtype bfloat16 --calib demo"
STD = 0.02
"""the standard deviation of every random matrix (the usual Llama initializer_range)"""
VERIFY_BELOW = 10**9
"""presets under this float32 size are loaded with from_pretrained after building"""
POLL = 0.1
"""seconds between samples of memory and disk"""
RSS_GROWTH = 0.15
RSS_SHARE = 0.5
LAYER_TIME_SPREAD = 0.25
TEXT = "The Python tutorial introduces the reader informally to the basic concepts and features of the language."
GB = 1e9


@dataclass(frozen=True)
class Preset:
    """The shapes of one synthetic Llama checkpoint."""

    name: str
    family: str
    """presets of one family differ only in depth"""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            tie_word_embeddings=self.tied,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            bos_token_id=1,  # the SmolLM2 tokenizer's
            eos_token_id=2,
            pad_token_id=2,
            dtype="bfloat16",
        )


LLAMA_1B = dict(family="1b", hidden=2048, intermediate=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256, tied=True)
LLAMA_8B = dict(
    family="8b", hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256, tied=False
)
TINY = dict(family="tiny", hidden=64, intermediate=256, heads=4, kv_heads=2, head_dim=16, vocab=49152, tied=True)
PRESETS = {
    p.name: p
    for p in (
        Preset("tiny-d2", layers=2, **TINY),
        Preset("tiny-d8", layers=8, **TINY),
        Preset("1b-d4", layers=4, **LLAMA_1B),
        Preset("1b-d5", layers=5, **LLAMA_1B),
        Preset("1b-d16", layers=16, **LLAMA_1B),
        Preset("1b-d20", layers=20, **LLAMA_1B),
        Preset("8b-d2", layers=2, **LLAMA_8B),
        Preset("8b-d8", layers=8, **LLAMA_8B),
        Preset("8b-d32", layers=32, **LLAMA_8B),  # Llama-3.1-8B at full depth
    )
}  # fmt: skip


# ---- building the checkpoints --------------------------------------------------------------------------------


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of `config` holds, from LlamaForCausalLM's state_dict."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def shard_of(name: str, layers: int) -> int:
    """0 for the embeddings, 1 + i for decoder layer i, layers + 1 for the rest (final norm, lm_head)."""
    if m := re.match(r"model\.layers\.(\d+)\.", name):
        return 1 + int(m[1])
    return 0 if name.startswith("model.embed_tokens.") else layers + 1


def random_tensor(name: str, shape: tuple[int, ...], seed: int, device: str = "cpu") -> torch.Tensor:
    """Ones for a norm's weight, else normal(0, STD); bfloat16 on the CPU, the same for the same (name, seed,
    device): the draw is made on `device` (CUDA's generator differs from the CPU's)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, STD, generator=g).cpu()


def write_shards(folder: Path, shapes: dict[str, tuple[int, ...]], layers: int, seed: int, device: str) -> None:
    """One safetensors file per shard, each made and freed in turn, and the index that maps them."""
    groups: dict[int, list[str]] = {}
    for name in shapes:
        groups.setdefault(shard_of(name, layers), []).append(name)
    weight_map, total = {}, 0
    for i, shard in enumerate(sorted(groups)):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_tensor(name, shapes[name], seed, device) for name in groups[shard]}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copy_tokenizer(folder: Path, source: Path | None) -> None:
    """The tokenizer files (tokenizer*, special_tokens_map.json, chat_template.jinja) of `source`, by default
    of the bundled SmolLM2."""
    if source is None:
        from svdkit.sources.models import smollm2_folder

        source = smollm2_folder(progress=False)
    for f in source.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy2(f, folder / f.name)


def build(a: argparse.Namespace, preset: Preset, models: Path) -> tuple[Path, str, bool]:
    """The checkpoint of `preset` in `models` (built unless a finished one of the same preset, seed and
    drawing device is there), a line saying what was done, and whether it was built now. A build goes into
    a hidden folder renamed into place."""
    folder, record = models / preset.name, models / f"{preset.name}.build.json"
    wanted = {"preset": asdict(preset), "seed": a.seed, "std": STD, "device": a.build_device}
    if folder.is_dir() and record.is_file():
        done = {"device": "cpu", **json.loads(record.read_text())}  # records before --build-device: the CPU's
        if {k: done.get(k) for k in wanted} == wanted:
            return folder, f"{preset.name}: cached in {folder} (built in {done['seconds']:.0f} s)", False
    start = time.perf_counter()
    tmp = models / f".{preset.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = preset.config()
    shapes = tensor_shapes(config)
    write_shards(tmp, shapes, preset.layers, a.seed, a.build_device)
    config.to_json_file(tmp / "config.json")
    copy_tokenizer(tmp, a.tokenizer)
    tmp.rename(folder)
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({**wanted, "seconds": seconds}, indent=2) + "\n")
    n = sum(math.prod(s) for s in shapes.values())
    line = f"{preset.name}: built {n:,} parameters, {shard_bytes(folder) / GB:.3g} GB in {seconds:.0f} s, in {folder}"
    return folder, line, True


def verify(folder: Path) -> str:
    """Load `folder` with AutoModelForCausalLM and run it on a sentence: a line saying what was seen; raises
    where a tensor is missing or unexpected or a logit is not finite."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if wrong:
        raise RuntimeError(f"{folder}: from_pretrained reports {wrong}")
    ids = AutoTokenizer.from_pretrained(folder)(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits.float()
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"{folder}: logits are not finite")
    return (
        f"{folder.name}: from_pretrained loads {type(model).__name__}, {ids.shape[1]} tokens give finite logits "
        f"(max |logit| {logits.abs().max().item():.3f})"
    )


def shard_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def parameters(folder: Path) -> int:
    """Elements in the checkpoint (bfloat16: total_size / 2)."""
    return json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2


# ---- measuring a run -----------------------------------------------------------------------------------------


def dir_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 if missing); files vanishing meanwhile are skipped."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS and RssAnon of a process in bytes, from /proc/PID/status (empty where gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    found = re.findall(r"^(VmHWM|VmRSS|RssAnon):\s+(\d+) kB", text, re.M)
    return {k: int(v) * 1024 for k, v in found}


@dataclass
class Watch:
    """What polling a process tree and some folders saw."""

    hwm: dict[int, int] = field(default_factory=dict)
    """pid -> the largest VmHWM read"""
    tree_sum: int = 0
    anon: int = 0
    disk: dict[str, int] = field(default_factory=dict)

    def sample(self, pid: int, folders: dict[str, Path]) -> None:
        try:
            pids = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            pids = [pid]
        total = 0
        for p in pids:
            s = proc_status(p)
            self.hwm[p] = max(self.hwm.get(p, 0), s.get("VmHWM", 0))
            self.anon = max(self.anon, s.get("RssAnon", 0))
            total += s.get("VmRSS", 0)
        self.tree_sum = max(self.tree_sum, total)
        for key, path in folders.items():
            self.disk[key] = max(self.disk.get(key, 0), dir_bytes(path))


@dataclass
class Finished:
    rc: int | None
    """None: killed at the time limit"""
    seconds: float
    peak_rss: int
    """the largest peak of any single process of the tree"""
    watch: Watch
    processes: int


def run_measured(cmd: list[str], env: dict[str, str], logs: Path, folders: dict[str, Path], timeout: float) -> Finished:
    """Run `cmd` with stdout and stderr to logs/compress.{out,err}, polling it every POLL seconds; it runs
    in a session of its own, killed whole at the time limit."""
    watch = Watch()
    start = time.perf_counter()
    with open(logs / "compress.out", "wb") as out, open(logs / "compress.err", "wb") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True)
    rc: int | None = None
    while True:
        watch.sample(proc.pid, folders)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.perf_counter() - start > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            _, _, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(POLL)
    proc.returncode = rc if rc is not None else -signal.SIGKILL  # reaped here: Popen must not wait again
    seconds = time.perf_counter() - start
    for key, path in folders.items():
        watch.disk[key] = max(watch.disk.get(key, 0), dir_bytes(path))
    peak = max(usage.ru_maxrss * 1024, *watch.hwm.values())  # ru_maxrss: kB on Linux
    return Finished(rc, seconds, peak, watch, len(watch.hwm))


def last_message(logs: Path) -> str:
    """The last line on stderr that is not a progress bar (a failed command's message), shortened."""
    err = (logs / "compress.err").read_text(errors="replace")
    lines = [s.strip() for s in re.split(r"[\r\n]+", err) if s.strip() and not re.search(r"\d+%\|", s)]
    return lines[-1][:300] if lines else "(nothing on stderr)"


def json_summary(logs: Path) -> dict:
    """The JSON summary `--json` prints as the last line of stdout ({} where there is none)."""
    lines = (logs / "compress.out").read_text(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


# ---- one run -------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One run's measurements (bytes, seconds) and where it stood."""

    model: str
    layers: int
    nproc: int
    params: int
    checkpoint_bytes: int
    float32_bytes: int
    threads: str
    command: str
    rc: int | None = None
    message: str = ""
    wall_s: float = 0.0
    compress_s: float | None = None
    """the `seconds` of the command's own JSON summary"""
    peak_rss_bytes: int = 0
    peak_rss_tree_sum_bytes: int = 0
    peak_anon_rss_bytes: int = 0
    processes_seen: int = 0
    statistics_peak_bytes: int = 0
    partial_peak_bytes: int = 0
    output_bytes: int = 0
    output_params: int | None = None
    loads: bool = False
    speedup: float | None = None
    device: str = ""
    """where the command ran (its JSON summary: the GPU's name on CUDA)"""
    peak_gpu_bytes: int | None = None
    """on CUDA: the command's torch.cuda.max_memory_allocated"""

    @property
    def ok(self) -> bool:
        return self.rc == 0


def compress_command(a: argparse.Namespace, folder: Path, run: Path, nproc: int) -> list[str]:
    tail = [
        "compress", str(folder), *shlex.split(a.extra),
        "--calib-samples", str(a.calib_samples), "--calib-seqlen", str(a.calib_seqlen),
        "--statistics-dir", str(run / "stats"), "--output", str(run / "out"), "--overwrite", "--json",
    ]  # fmt: skip
    if nproc == 1:
        return [a.python, "-m", "svdkit", *tail]
    torchrun = str(Path(a.python).parent / "torchrun")
    return [torchrun, "--standalone", "--nproc-per-node", str(nproc), "-m", "svdkit", *tail]


def environment(nproc: int) -> dict[str, str]:
    """The runs' environment: offline; N processes share the cores (OMP_NUM_THREADS unless set)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return env


def measure(a: argparse.Namespace, preset: Preset, folder: Path, nproc: int) -> Row:
    """Compress `folder` with `nproc` processes and measure it (the output removed after unless --keep)."""
    run = Path(a.work) / "runs" / f"{preset.name}-np{nproc}"
    shutil.rmtree(run, ignore_errors=True)
    (run / "stats").mkdir(parents=True)
    cmd = compress_command(a, folder, run, nproc)
    env = environment(nproc)
    params = parameters(folder)
    row = Row(
        preset.name, preset.layers, nproc, params, shard_bytes(folder), 4 * params,
        env.get("OMP_NUM_THREADS", f"torch default ({torch.get_num_threads()})"), shlex.join(cmd),
    )  # fmt: skip
    partial = run / ".out.svdkit-partial"
    done = run_measured(cmd, env, run, {"stats": run / "stats", "partial": partial}, a.timeout)
    row.rc, row.wall_s, row.peak_rss_bytes, row.processes_seen = done.rc, done.seconds, done.peak_rss, done.processes
    row.peak_rss_tree_sum_bytes, row.peak_anon_rss_bytes = done.watch.tree_sum, done.watch.anon
    row.statistics_peak_bytes = done.watch.disk.get("stats", 0)
    row.partial_peak_bytes = done.watch.disk.get("partial", 0)
    if not row.ok:
        row.message = "timed out" if done.rc is None else last_message(run)
        return row
    summary = json_summary(run)
    row.compress_s, row.output_params = summary.get("seconds"), summary.get("params")
    row.device, row.peak_gpu_bytes = summary.get("device", ""), summary.get("peak_gpu_bytes")
    row.output_bytes = dir_bytes(run / "out")
    info = subprocess.run([a.python, "-m", "svdkit", "info", str(run / "out"), "--json"], capture_output=True, env=env)
    row.loads = info.returncode == 0
    if not row.loads:
        row.message = f"svdkit info exited {info.returncode}: {info.stderr.decode(errors='replace').strip()[-300:]}"
    if not a.keep:
        shutil.rmtree(run / "out", ignore_errors=True)
    return row


def missing_flags(python: str, cmd: list[str]) -> list[str]:
    """The flags of `cmd` that ``svdkit compress --help`` does not list."""
    shown = subprocess.run([python, "-m", "svdkit", "compress", "--help"], capture_output=True, text=True)
    listed = set(re.findall(r"--[a-z][a-z0-9-]*", shown.stdout))
    after = cmd[cmd.index("compress") + 1 :]
    return [t.split("=")[0] for t in after if t.startswith("--") and t.split("=")[0] not in listed]


# ---- the report ----------------------------------------------------------------------------------------------


def cells(r: Row) -> list[str]:
    given = [r.model, str(r.layers), f"{r.params:,}", f"{r.checkpoint_bytes / GB:.3g}", f"{r.float32_bytes / GB:.3g}"]
    if not r.ok:
        why = f"timed out after {r.wall_s:.0f} s" if r.rc is None else f"exit {r.rc}: {r.message}"
        return [*given, str(r.nproc), *([""] * 9), why]
    gpu = "—" if r.peak_gpu_bytes is None else f"{r.peak_gpu_bytes / GB:.2f}"
    return [
        *given, str(r.nproc), r.device, f"{r.wall_s:.1f}", f"{r.wall_s / r.layers:.2f}", gpu,
        f"{r.peak_rss_bytes / GB:.2f}",
        f"{r.peak_rss_bytes / r.float32_bytes:.2f}", f"{r.statistics_peak_bytes / 1e6:.1f}",
        f"{r.output_bytes / GB:.3g}", f"{r.speedup:.2f}x" if r.speedup else "—",
        "yes" if r.loads else f"NO: {r.message}",
    ]  # fmt: skip


def table(rows: list[Row]) -> str:
    head = (
        "| model | layers | params | checkpoint bf16 GB | float32 GB | procs | device | wall s | s/layer "
        "| peak GPU GB | peak RSS GB "
        "| peak RSS / float32 | statistics disk MB | output GB | speed-up | loads back |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def depth_checks(shallow: Row, deep: Row) -> list[str]:
    """The goals that compare two depths of one width (single-process runs)."""
    growth = deep.peak_rss_bytes / shallow.peak_rss_bytes - 1
    share = deep.peak_rss_bytes / deep.float32_bytes
    per = [r.wall_s / r.layers for r in (shallow, deep)]
    marginal = (deep.wall_s - shallow.wall_s) / (deep.layers - shallow.layers)
    pair = f"{deep.model} vs {shallow.model}"
    return [
        f"peak RSS, {pair}: {deep.peak_rss_bytes / GB:.2f} vs {shallow.peak_rss_bytes / GB:.2f} GB, "
        f"{growth:+.1%} (goal: at most +{RSS_GROWTH:.0%}): {verdict(growth <= RSS_GROWTH)}",
        f"peak RSS / float32 size, {deep.model}: {share:.2f} (goal: at most {RSS_SHARE}): "
        f"{verdict(share <= RSS_SHARE)}",
        f"s/layer, {pair}: {per[1]:.2f} vs {per[0]:.2f} (ratio {per[1] / per[0]:.2f}; each added layer "
        f"{marginal:.2f} s) (goal: ratio within 1 ± {LAYER_TIME_SPREAD}): "
        f"{verdict(abs(per[1] / per[0] - 1) <= LAYER_TIME_SPREAD)}",
    ]


def goal_checks(rows: list[Row]) -> list[str]:
    """Per family with two depths or more: shallowest against deepest; per model run with N processes too:
    N against 1. Families whose float32 size is under VERIFY_BELOW are marked as smoke tests."""
    lines = []
    single = [r for r in rows if r.ok and r.nproc == 1]
    for family in dict.fromkeys(PRESETS[r.model].family for r in single):
        same = sorted((r for r in single if PRESETS[r.model].family == family), key=lambda r: r.layers)
        if len(same) >= 2 and same[0].layers < same[-1].layers:
            smoke = (
                " [smoke preset: the interpreter outweighs the model]" if same[-1].float32_bytes < VERIFY_BELOW else ""
            )
            lines += [line + smoke for line in depth_checks(same[0], same[-1])]
    for r in rows:
        if r.nproc > 1 and r.speedup is not None:
            lines.append(
                f"{r.nproc} processes vs 1, {r.model}: {r.speedup:.2f}x (goal: at least 1): {verdict(r.speedup >= 1)}"
            )
    return lines or ["(none: no two depths of one width, and no multi-process run, finished)"]


def add_speedups(rows: list[Row]) -> None:
    one = {r.model: r for r in rows if r.ok and r.nproc == 1}
    for r in rows:
        if r.ok and r.nproc > 1 and r.model in one:
            r.speedup = one[r.model].wall_s / r.wall_s


# ---- the driver ----------------------------------------------------------------------------------------------


def build_all(a: argparse.Namespace) -> dict[str, Path]:
    models = Path(a.work) / "models"
    models.mkdir(parents=True, exist_ok=True)
    folders = {}
    for name in a.models:
        folders[name], line, built = build(a, PRESETS[name], models)
        print(line, flush=True)
        if built and 4 * parameters(folders[name]) < VERIFY_BELOW:
            print("  " + verify(folders[name]), flush=True)
    return folders


def run_all(a: argparse.Namespace, folders: dict[str, Path]) -> list[Row]:
    rows = []
    for name, folder in folders.items():
        for nproc in dict.fromkeys([1, a.nproc if a.nproc_models is None or name in a.nproc_models else 1]):
            print(f"compressing {name} with {nproc} process(es) ...", flush=True)
            row = measure(a, PRESETS[name], folder, nproc)
            print(f"  exit {row.rc}, {row.wall_s:.1f} s, peak RSS {row.peak_rss_bytes / GB:.2f} GB", flush=True)
            print("  " + table([row]).splitlines()[-1], flush=True)
            rows.append(row)
    add_speedups(rows)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=PRESETS, default=["1b-d5", "1b-d20", "8b-d2"], metavar="PRESET",
                   help=f"presets, of: {', '.join(PRESETS)} (default 1b-d5 1b-d20 8b-d2)")  # fmt: skip
    p.add_argument("--work", default="bench-output/scale", help="checkpoints, runs and scale.json (bench-output/scale)")
    p.add_argument("--nproc", type=int, default=1, help="also compress through torchrun with N processes (1: not)")
    p.add_argument("--nproc-models", nargs="+", choices=PRESETS, metavar="PRESET",
                   help="only these presets run with --nproc processes too (default: every one)")  # fmt: skip
    p.add_argument("--calib-samples", type=int, default=4, help="calibration windows (4)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window (512)")
    p.add_argument("--extra", default=EXTRA, help=f"the other flags of svdkit compress (default: {EXTRA!r})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (0)")
    p.add_argument("--build-device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the random weights are drawn (auto: CUDA where present; its draws differ from the "
                   "CPU's, so a checkpoint records it)")  # fmt: skip
    p.add_argument(
        "--tokenizer",
        type=Path,
        metavar="FOLDER",
        help="copy the tokenizer files of FOLDER (default: the bundled SmolLM2's)",
    )
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds one compression may take (7200)")
    p.add_argument("--build-only", action="store_true", help="build (and check) the checkpoints, compress nothing")
    p.add_argument("--keep", action="store_true", help="keep the compressed folders (WORK/runs/RUN/out)")
    p.add_argument("--python", default=sys.executable, help="the interpreter with svdkit (this one)")
    a = p.parse_args()
    if a.nproc < 1:
        p.error("--nproc must be at least 1")
    a.work = str(Path(a.work).absolute())
    if a.build_device == "auto":
        a.build_device = "cuda" if torch.cuda.is_available() else "cpu"
    folders = build_all(a)
    if a.build_only:
        return
    missing = missing_flags(a.python, compress_command(a, Path("MODEL"), Path("RUN"), 1))
    if missing:
        sys.exit(
            f"compression not run: `svdkit compress --help` does not list {', '.join(missing)} (checkpoints built)"
        )
    rows = run_all(a, folders)
    print("\n" + table(rows))
    print(f"\nGB = 10^9 bytes; peak RSS: the largest of any one process ({'torchrun and its workers, ' * (a.nproc > 1)}"
          f"VmHWM and wait4's ru_maxrss); {os.cpu_count()} cores\n\ngoal checks:")  # fmt: skip
    checks = goal_checks(rows)
    for line in checks:
        print(f"- {line}")
    out = Path(a.work) / "scale.json"
    out.write_text(json.dumps({"argv": sys.argv[1:], "rows": [asdict(r) for r in rows], "checks": checks}, indent=2))
    print(f"\nrows written to {out}")
    sys.exit(0 if all(r.ok and r.loads for r in rows) else 1)


if __name__ == "__main__":
    main()
