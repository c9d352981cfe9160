"""The svdkit command line: compress, eval, generate, info, densify, demo, methods, bench.

Bad input ends with one line ``svdkit: error: ...`` on standard error and exit code 2; ``--json``
makes a command print one JSON object as the last line of standard output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SvdkitError

if TYPE_CHECKING:
    from ..bench.grid import BenchConfig

__all__ = ["main", "build_parser", "add_bench_arguments", "bench_config", "CURVE_FILE"]

CURVE_FILE = "training_curve.json"
"""written next to a compressed model whose method trains (soco): one record per step"""


def _ratio(text: str) -> float:
    from ..core.ranks import check_ratio

    try:
        return check_ratio(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1), got {text!r}") from e
    except SvdkitError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _ratio_or_zero(text: str) -> float:
    try:
        if float(text) == 0.0:
            return 0.0
    except ValueError:
        pass
    return _ratio(text)


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from e
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_nonnegative = _int_at_least(0, "an integer >= 0")
RANK_MULTIPLE_HELP = (
    "round the ranks to multiples of this within the same parameter budget, for faster products (8); "
    "1 keeps the allocation's exact ranks"
)


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"method options are KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


class _Parser(argparse.ArgumentParser):
    """argparse with svdkit's error format: one line on stderr, exit code 2 (``--help`` shows usage)."""

    def error(self, message: str):
        self.exit(2, f"svdkit: error: {self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from ..allocators import allocator_names
    from ..methods import method_names
    from ..pipeline.update import UPDATES
    from ..saved.kvcache import KV_MODES
    from ..sources.text import SOURCES

    sources = f"a text file or one of {', '.join(SOURCES)}"
    p = _Parser(prog="svdkit", description="SVD-based compression of causal language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compress", help="compress a model into a low-rank model folder")
    c.add_argument("model", help="model folder, hub id, .gguf file, or 'smollm2-135m'")
    c.add_argument("--method", default="svd-llm", help=f"one of: {', '.join(method_names())} (default svd-llm)")
    c.add_argument(
        "--ratio",
        type=_ratio_or_zero,
        default=0.2,
        help="fraction of each matrix's parameters removed (0.2); 0 with --kv-ratio compresses only k/v",
    )
    c.add_argument(
        "--kv-ratio",
        type=_ratio,
        default=None,
        metavar="RHO",
        help="fix every k_proj/v_proj at the rank that shrinks a latent KV cache by RHO, e.g. 0.5 "
        "(load with --kv-cache latent / kv_cache='latent' to use it)",
    )
    c.add_argument("--calib", default="demo", help=f"calibration text: {sources} (default demo)")
    c.add_argument("--calib-samples", type=_positive, default=32, help="calibration windows (32)")
    c.add_argument("--calib-seqlen", type=_positive, default=2048, help="tokens per calibration window (2048)")
    c.add_argument("--calib-offset", type=_nonnegative, default=0, help="skip this many tokens first (0)")
    c.add_argument("--seed", type=int, default=0, help="seed of the calibration offsets (0)")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    c.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option (repeatable), e.g. rel_eps=1e-5 or alpha=0.5",
    )
    c.add_argument(
        "--allocation",
        default="uniform",
        help=f"how ranks are spread over the matrices: {', '.join(allocator_names())} (default uniform)",
    )
    c.add_argument(
        "--allocation-option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an allocation option (repeatable), e.g. windows=2, seqlen=256, grid=[0.2,0.4,0.6,0.8], cache=FILE",
    )
    c.add_argument(
        "--update",
        choices=UPDATES,
        default="none",
        help="after truncation, refit each B by least squares on the calibration inputs (lstsq); default none",
    )
    c.add_argument(
        "--statistics-dir",
        metavar="DIR",
        help="where non-uniform allocations and gradient statistics spill every layer's statistics "
        "(a temporary folder inside DIR, removed afterwards; default: the system's temporary folder)",
    )
    c.add_argument("--rank-multiple", type=_positive, default=8, metavar="N", help=RANK_MULTIPLE_HELP)
    c.add_argument(
        "--sequential",
        action="store_true",
        help="statistics of each layer from the already-compressed layers before it",
    )
    c.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    c.add_argument(
        "--densify",
        action="store_true",
        help="write a plain dense model (W' = B A) that any tool loads, instead of the low-rank one",
    )
    c.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    e = sub.add_parser("eval", help="perplexity of a model on a text, or zero-shot accuracy on tasks (--tasks)")
    e.add_argument("model", help="model folder (compressed or not), hub id, .gguf file, or 'smollm2-135m'")
    e.add_argument("--dataset", default="wikitext2", help=f"{sources} (default wikitext2)")
    e.add_argument("--seqlen", type=_positive, default=2048, help="tokens per window (2048)")
    e.add_argument("--max-windows", type=_positive, default=None, help="evaluate at most N windows")
    e.add_argument("--offset", type=_nonnegative, default=0, help="skip this many tokens first (0)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    e.add_argument(
        "--tasks",
        metavar="TASK[,TASK...]",
        help="instead of perplexity, zero-shot accuracy on these lm-evaluation-harness tasks, e.g. "
        "arc_easy,hellaswag (needs: pip install 'svdkit[zeroshot]')",
    )
    e.add_argument("--limit", type=_positive, default=None, help="with --tasks: at most N documents per task")
    e.add_argument("--batch-size", type=_positive, default=None, help="with --tasks: documents per batch (1)")
    e.add_argument(
        "--task-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="with --tasks: a folder of lm-eval task YAML files whose tasks can be named (repeatable)",
    )
    e.add_argument("--num-fewshot", type=_nonnegative, default=None, help="with --tasks: examples per prompt (0)")
    e.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    i = sub.add_parser("info", help="what a compressed model folder holds: method, ratio, ranks, parameters")
    i.add_argument("folder")
    i.add_argument("--plot", metavar="FILE.png", help="also draw the rank map (layers x module types) as a PNG")
    i.add_argument("--plot-curve", metavar="FILE.png", help=f"draw the training curve ({CURVE_FILE}, soco) as a PNG")
    i.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    d = sub.add_parser("densify", help="write a compressed folder as a plain dense model")
    d.add_argument("folder")
    d.add_argument("--output", required=True)
    d.add_argument("--overwrite", action="store_true")

    g = sub.add_parser("generate", help="greedy generation from a prompt, with the ordinary or the latent KV cache")
    g.add_argument("model", help="model folder (compressed or not), hub id, .gguf file, or 'smollm2-135m'")
    g.add_argument("--prompt", default="The history of the city begins", help="text to continue")
    g.add_argument("--max-new-tokens", type=_positive, default=32, help="tokens to generate (32)")
    g.add_argument(
        "--kv-cache",
        choices=KV_MODES,
        default="ordinary",
        help="latent: cache A x of the low-rank k_proj/v_proj instead of keys and values (default ordinary)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g.add_argument("--json", action="store_true", help="print a JSON summary as the last line")

    sub.add_parser("methods", help="list the compression methods")

    b = sub.add_parser(
        "bench",
        help="the protocol's grid: methods x ratios x allocations, quality, time, speed and memory",
        description="Run the fixed protocol (../shared/PROTOCOL.md) over a grid of cells; write results.json, "
        "results.md and PNG plots into --out. A cell is METHOD[@ALLOCATION[:KEY=VALUE,...]][+lstsq][+seq]. "
        "A rerun with the same --out resumes from the finished cells.",
    )
    add_bench_arguments(b)
    b.add_argument("--out", required=True, help="folder for results.json, results.md and plots/")

    m = sub.add_parser("demo", help="compress the bundled SmolLM2-135M and show before/after")
    m.add_argument("--ratio", type=_ratio, default=0.2, help="fraction of parameters removed (0.2)")
    m.add_argument("--output", default="svdkit-demo-output", help="where the compressed model is written")
    m.add_argument("--device", default="auto")
    return p


def _emit(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj), flush=True)


def add_bench_arguments(b: argparse.ArgumentParser) -> None:
    """The grid and protocol options of `svdkit bench` (shared with benchmarks/protocol.py)."""
    b.add_argument("--model", default="smollm2-135m", help="model to compress (default smollm2-135m)")
    b.add_argument("--methods", nargs="+", default=["svd", "svd-llm"], metavar="CELL", help="cells (see above)")
    b.add_argument("--ratios", nargs="+", type=_ratio, default=[0.2, 0.4, 0.6], help="ratios (0.2 0.4 0.6)")
    b.add_argument(
        "--data-dir",
        default=None,
        help="folder with wikitext-2-raw/wiki.test.raw and ptb/ptb.valid.txt (default: $SVDKIT_DATA, else datasets)",
    )
    b.add_argument("--calib-samples", type=_positive, default=32, help="calibration windows (32)")
    b.add_argument("--calib-offset", type=_nonnegative, default=150000, help="calibration offsets from (150000)")
    b.add_argument("--seqlen", type=_positive, default=2048, help="tokens per window (2048)")
    b.add_argument("--seed", type=int, default=0, help="calibration window seed (0)")
    b.add_argument("--eval-windows", type=_positive, default=16, help="WikiText-2 evaluation windows (16)")
    b.add_argument("--ptb-windows", type=_positive, default=8, help="PTB evaluation windows (8)")
    b.add_argument("--sensitivity-windows", type=_positive, default=None, help="sensitivity allocation: windows")
    b.add_argument("--sensitivity-seqlen", type=_positive, default=None, help="sensitivity allocation: tokens each")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    b.add_argument("--no-speed", action="store_true", help="skip the speed and memory measurements")
    b.add_argument("--decode-tokens", type=_nonnegative, default=64, help="tokens generated per decode run (64)")
    b.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    b.add_argument("--rank-multiple", type=_positive, default=8, metavar="N", help=RANK_MULTIPLE_HELP)


def bench_config(a) -> BenchConfig:
    """A :class:`svdkit.bench.BenchConfig` from parsed `svdkit bench` arguments."""
    from ..bench.grid import BenchConfig

    return BenchConfig(
        model=a.model,
        cells=a.methods,
        ratios=a.ratios,
        data_dir=a.data_dir,
        calib_samples=a.calib_samples,
        calib_offset=a.calib_offset,
        seqlen=a.seqlen,
        seed=a.seed,
        eval_windows=a.eval_windows,
        ptb_windows=a.ptb_windows,
        sensitivity_windows=a.sensitivity_windows,
        sensitivity_seqlen=a.sensitivity_seqlen,
        device=a.device,
        speed=not a.no_speed,
        decode_tokens=a.decode_tokens,
        plots=not a.no_plots,
        rank_multiple=a.rank_multiple,
    )


def cmd_bench(a) -> None:
    from ..bench.grid import parse_spec, run_bench
    from ..bench.report import markdown

    for spec in a.methods:
        parse_spec(spec)  # bad cells fail before the model loads
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise SvdkitError(f"--out '{out}' exists and is a file: give a folder")
    out.mkdir(parents=True, exist_ok=True)
    report = run_bench(
        bench_config(a),
        out / "results.json",
        out / "results.md",
        out / "plots",
        command="svdkit " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "svdkit bench",
    )
    print(markdown(report))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'plots'}")


def cmd_compress(a) -> None:
    from ..core.device import resolve_device
    from ..methods import get_method, make_config
    from ..pipeline.compress import compress
    from ..saved.folder import densify, prepare_output_dir, save
    from ..sources.models import load_model

    start = time.perf_counter()
    from ..allocators import get_allocator, make_allocation_config

    if a.ratio == 0 and a.kv_ratio is None:
        raise SvdkitError("--ratio 0 compresses nothing: give a ratio in (0, 1), or --kv-ratio to compress only k/v")
    if a.densify and a.kv_ratio is not None:
        raise SvdkitError("--densify writes dense k_proj/v_proj, which have no latent to cache: drop one of them")
    make_config(get_method(a.method), dict(a.option))  # fail on a bad method or option before any work
    make_allocation_config(get_allocator(a.allocation), dict(a.allocation_option))
    resolve_device(a.device)
    out = prepare_output_dir(a.output, a.overwrite)
    model, tok = load_model(a.model)
    result = compress(
        model,
        tok,
        method=a.method,
        ratio=a.ratio,
        calib=a.calib,
        calib_samples=a.calib_samples,
        calib_seqlen=a.calib_seqlen,
        calib_offset=a.calib_offset,
        seed=a.seed,
        device=a.device,
        method_options=dict(a.option),
        sequential=a.sequential,
        allocation=a.allocation,
        allocation_options=dict(a.allocation_option),
        update=a.update,
        statistics_dir=a.statistics_dir,
        kv_ratio=a.kv_ratio,
        rank_multiple=a.rank_multiple,
    )
    model.to("cpu")
    if a.densify:
        densify(model, tok, out, overwrite=a.overwrite, inplace=True)
    else:
        save(model, tok, out, overwrite=a.overwrite)
    seconds = time.perf_counter() - start
    t = result.timings
    print(
        f"{a.method} at ratio {a.ratio}: {result.params_dense:,} -> {result.params:,} parameters "
        f"({100 * (1 - result.params / result.params_dense):.1f}% fewer), {len(result.ranks)} low-rank "
        f"matrices, {len(result.dense_kept)} kept dense\n"
        f"time {seconds:.1f}s (calibration {t['calibration']:.1f}s, decomposition {t['decomposition']:.1f}s, "
        f"allocation {t['allocation']:.2f}s); written to {out}" + (" (densified)" if a.densify else "")
    )
    if a.kv_ratio is not None:
        print(
            f"k_proj/v_proj at the ranks of a {a.kv_ratio:.0%} smaller KV cache: "
            f"svdkit generate {out} --kv-cache latent"
        )
    if result.training:
        tr = result.training
        print(
            f"training: {tr['steps']} steps in {tr['seconds']:.0f}s, final loss {tr['final_loss']:.4f}; "
            f"{tr['kept']:,} target parameters kept for a budget of {tr['budget']:,}"
        )
        try:  # the model folder is complete already; the curve is an extra
            (out / CURVE_FILE).write_text(json.dumps(tr["curve"]) + "\n")
        except OSError as e:
            raise SvdkitError(f"the model was written to {out}, but not its training curve: {e}") from e
    if a.allocation != "uniform" or result.training:
        print(rank_summary(result.ranks, result.dense_kept, _shapes(model, result)))
        for key, value in result.allocation.items():
            if key not in ("name", "config"):
                print(f"  {key}: {value}")
    _emit(
        {
            "output": str(out),
            "params": result.params_dense if a.densify else result.params,  # what the folder holds
            "params_dense": result.params_dense,
            "seconds": round(seconds, 3),
        },
        a.json,
    )


def _shapes(model, result) -> dict[str, tuple[int, int]]:
    out = {}
    for name in list(result.ranks) + list(result.dense_kept):
        mod = model.get_submodule(name)
        out[name] = (mod.out_features, mod.in_features)
    return out


def rank_summary(ranks: dict[str, int], dense: list[str], shapes: dict[str, tuple[int, int]]) -> str:
    """Per module type (q_proj, ...): how many matrices, their rank range and mean kept parameter share."""
    groups: dict[str, list[float]] = {}
    rank_range: dict[str, list[int]] = {}
    for name, (m, n) in shapes.items():
        kind = name.rsplit(".", 1)[-1]
        k = ranks.get(name)
        groups.setdefault(kind, []).append(1.0 if k is None else k * (m + n) / (m * n))
        if k is not None:
            rank_range.setdefault(kind, []).append(k)
    lines = ["chosen ranks by module type (kept share of parameters; dense = kept whole):"]
    for kind, kept in groups.items():
        r = rank_range.get(kind, [])
        span = f"rank {min(r)}..{max(r)}" if r else "no low-rank"
        n_dense = sum(1 for name in dense if name.rsplit(".", 1)[-1] == kind)
        lines.append(
            f"  {kind:<10} {len(kept):3d} matrices, {span}, mean kept {sum(kept) / len(kept):.2f}, {n_dense} dense"
        )
    return "\n".join(lines)


def cmd_eval(a) -> None:
    from ..core.device import resolve_device
    from ..measure.perplexity import perplexity
    from ..sources.models import load_model

    if a.tasks is not None:
        return _eval_zero_shot(a)
    only_with_tasks = {"--limit": a.limit, "--batch-size": a.batch_size, "--num-fewshot": a.num_fewshot}
    given = [flag for flag, value in only_with_tasks.items() if value is not None]
    given += ["--task-dir"] if a.task_dir else []
    if given:
        raise SvdkitError(f"{', '.join(given)}: only for zero-shot evaluation, which needs --tasks TASK[,TASK...]")
    dev = resolve_device(a.device)
    model, tok = load_model(a.model)
    model.to(dev)
    r = perplexity(model, tok, a.dataset, seqlen=a.seqlen, max_windows=a.max_windows, offset=a.offset)
    print(
        f"perplexity {r.ppl:.4f} on {a.dataset}: {r.windows} windows of {a.seqlen}, {r.tokens} predicted "
        f"tokens, {r.params:,} parameters"
    )
    _emit({"ppl": r.ppl, "windows": r.windows, "tokens": r.tokens, "params": r.params}, a.json)


def _eval_zero_shot(a) -> None:
    from ..core.device import resolve_device
    from ..core.lowrank import count_parameters
    from ..measure.zeroshot import format_results, require_lm_eval, zero_shot
    from ..sources.models import load_model

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not tasks:
        raise SvdkitError("--tasks needs at least one task name, e.g. --tasks arc_easy,hellaswag")
    for folder in a.task_dir:
        if not Path(folder).is_dir():
            raise SvdkitError(f"--task-dir '{folder}' is not a folder: give a folder of lm-eval task YAML files")
    require_lm_eval()  # before loading the model
    dev = resolve_device(a.device)
    model, tok = load_model(a.model)
    model.to(dev)
    shots = a.num_fewshot or 0
    results = zero_shot(
        model,
        tok,
        tasks,
        batch_size=a.batch_size or 1,
        limit=a.limit,
        task_dirs=a.task_dir,
        num_fewshot=shots,
    )
    params = count_parameters(model)
    limited = f", at most {a.limit} documents per task" if a.limit else ""
    print(f"{shots}-shot accuracy of {a.model} ({params:,} parameters){limited}")
    print(format_results(results))
    _emit({"tasks": results, "num_fewshot": shots, "limit": a.limit, "params": params}, a.json)


def cmd_info(a) -> None:
    from ..saved.folder import folder_info, natural_key

    info = folder_info(a.folder)
    ranks = dict(sorted(info["ranks"].items(), key=lambda kv: natural_key(kv[0])))
    alloc = info.get("allocation") or {}
    multiple = alloc.get("rank_multiple", 1)
    aligned = f" (ranks in multiples of {multiple})" if multiple > 1 else ""
    print(
        f"method {info['method']}, ratio {info['ratio']}, allocation {alloc.get('name', 'uniform')}{aligned}, "
        f"svdkit {info['version']}"
    )
    if info["params_dense"]:
        print(
            f"parameters {info['params']:,} (dense {info['params_dense']:,}, "
            f"{100 * (1 - info['params'] / info['params_dense']):.1f}% fewer)"
        )
    if info["update"] != "none":
        print(f"parameter update: {info['update']}")
    if info["kv_ratio"] is not None:
        print(f"k_proj/v_proj sized for a {info['kv_ratio']:.0%} smaller KV cache (load with kv_cache='latent')")
    if info["training"]:
        tr = info["training"]
        print(
            f"training: {tr.get('steps')} steps in {tr.get('seconds')}s, final loss {tr.get('final_loss')}; "
            f"{tr.get('kept', '?')} target parameters kept for a budget of {tr.get('budget', '?')}"
        )
    shapes = info["shapes"]
    print(f"{len(ranks)} low-rank modules, {len(info['dense_kept'])} target modules kept dense:")
    width = max((len(n) for n in shapes), default=0)
    for name, (m, n) in shapes.items():
        k = ranks.get(name)
        what = f"rank {k:<5d} keeps {k * (m + n) / (m * n):6.1%}" if k is not None else "dense"
        print(f"  {name:<{width}}  {m}x{n}  {what}")
    if a.plot:
        from ..bench.plots import plot_rank_map

        plot_rank_map(info, a.plot)
        print(f"rank map written to {a.plot}")
    if a.plot_curve:
        from ..bench.plots import plot_curve

        curve_file = Path(a.folder) / CURVE_FILE
        if not curve_file.is_file():
            raise SvdkitError(f"'{a.folder}' has no {CURVE_FILE}: only a method that trains (soco) writes one")
        try:
            curve = json.loads(curve_file.read_text())
        except (OSError, ValueError) as e:
            raise SvdkitError(f"cannot read {curve_file}: {e}") from e
        plot_curve(curve, a.plot_curve, title=f"{info['method']} at ratio {info['ratio']}")
        print(f"training curve written to {a.plot_curve}")
    keys = ("method", "ratio", "allocation", "update", "kv_ratio", "params", "params_dense", "ranks", "dense_kept")
    _emit({k: info[k] for k in keys}, a.json)


def cmd_densify(a) -> None:
    from ..saved.folder import densify, prepare_output_dir
    from ..saved.format import read_svdkit_config
    from ..sources.models import load_model

    if read_svdkit_config(a.folder) is None:
        raise SvdkitError(f"'{a.folder}' is not an svdkit-compressed model folder")
    out = prepare_output_dir(a.output, a.overwrite)
    model, tok = load_model(a.folder)
    densify(model, tok, out, overwrite=a.overwrite, inplace=True)
    print(f"dense model written to {out}")


def cmd_generate(a) -> None:
    import torch
    from transformers import DynamicCache

    from ..core.compat import cache_kwargs
    from ..saved.folder import load
    from ..saved.kvcache import kv_cache_bytes

    model, tok = load(a.model, device=a.device, kv_cache=a.kv_cache)
    ids = tok(a.prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    if ids.numel() == 0:
        raise SvdkitError("--prompt is empty after tokenization: give some text")
    cache = DynamicCache(config=model.config)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=a.max_new_tokens, do_sample=False, pad_token_id=pad, **cache_kwargs(model, cache)
        )
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    cached = cache.get_seq_length()
    if cached != out.shape[1] - 1:  # the last token is never fed back; anything else means the cache went unused
        raise SvdkitError(
            f"the {a.kv_cache} KV cache holds {cached} tokens after generating {out.shape[1]} in all (expected "
            f"{out.shape[1] - 1}): this transformers release does not use svdkit's cache as expected, so the text is "
            "not trusted; use the transformers release in svdkit's lock"
        )
    text = tok.decode(new, skip_special_tokens=True)
    per_token = kv_cache_bytes(cache) / max(cached, 1)
    print(a.prompt + text)
    print(
        f"{new.numel()} tokens in {seconds:.2f}s ({new.numel() / seconds:.1f} tokens/s, prompt included); "
        f"{a.kv_cache} KV cache: {per_token:,.0f} bytes per token ({cached} tokens cached)"
    )
    _emit(
        {
            "text": text,
            "tokens": new.tolist(),
            "seconds": round(seconds, 3),
            "kv_cache": a.kv_cache,
            "kv_bytes_per_token": per_token,
            "kv_tokens_cached": cached,
        },
        a.json,
    )


def cmd_methods(a) -> None:
    import dataclasses

    from ..allocators import allocator_names, get_allocator
    from ..methods import get_method, method_names

    def options(cls) -> str:
        fields = [f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)]
        return f"\n{'':14s}options: {', '.join(fields)}" if fields else ""

    print("methods (--method, options with --option KEY=VALUE):")
    for name in method_names():
        m = get_method(name)
        print(f"  {name:12s}{m.summary}" + (f"  [{m.paper}]" if m.paper else "") + options(m.config_cls))
    print("allocations (--allocation, options with --allocation-option KEY=VALUE):")
    for name in allocator_names():
        al = get_allocator(name)
        print(f"  {name:12s}{al.summary}" + options(al.config_cls))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"svdkit: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    warnings.showwarning = _show_warning
    commands = {
        "compress": cmd_compress,
        "eval": cmd_eval,
        "info": cmd_info,
        "densify": cmd_densify,
        "methods": cmd_methods,
        "bench": cmd_bench,
        "generate": cmd_generate,
    }
    try:
        if a.command == "demo":
            from .demo import run_demo

            run_demo(ratio=a.ratio, output=a.output, device=a.device)
        else:
            commands[a.command](a)
    except SvdkitError as e:
        print(f"svdkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0
