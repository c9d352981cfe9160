"""``svdkit compress``: compress a model into a low-rank model folder (or a densified one)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from ..allocators import allocator_names, get_allocator
from ..calibration.store import check_spill_space, spill_bytes
from ..core import distributed
from ..core.atomic import check_not_source, prepare_output_dir
from ..core.device import resolve_device
from ..core.disk import check_free_space
from ..core.lowrank import count_parameters
from ..core.owner import group_owns
from ..core.report import finite, stage_line
from ..errors import SvdkitError
from ..heal import healer_names
from ..methods import method_names
from ..pipeline.compress import run_plan
from ..pipeline.options import CalibrationSettings, CompressionOptions
from ..pipeline.partial import partial_path
from ..pipeline.plan import make_plan
from ..pipeline.streaming import NotStreamable, compress_folder
from ..pipeline.update import UPDATES
from ..saved.contents import compression_words, dense_bytes
from ..saved.folder import densify, save
from ..saved.format import read_svdkit_config
from ..saved.kvcache import latent_kv_problem
from ..sources.checkpoint import Checkpoint, check_fits_memory
from ..sources.mixture import SELF
from ..sources.models import load_model, local_folder
from .common import (
    CALIBRATION_FLAGS,
    CURVE_FILE,
    HEALING_FILE,
    add_dtype,
    add_fields,
    emit,
    fields_from_args,
    option_pair,
    positive,
    ratio,
    ratio_or_zero,
)

__all__ = ["add_parser", "run", "rank_summary", "options_from_args"]

FLAGS = {
    "method": {"help": f"compression method, one of: {', '.join(method_names())}"},
    "ratio": {"type": ratio_or_zero},
    "kv_ratio": {"type": ratio, "metavar": "RHO"},
    "method_options": {"flag": "--option", "type": option_pair, "action": "append", "metavar": "KEY=VALUE"},
    "allocation": {"help": f"how ranks are spread over the matrices: {', '.join(allocator_names())}"},
    "allocation_options": {
        "flag": "--allocation-option",
        "type": option_pair,
        "action": "append",
        "metavar": "KEY=VALUE",
    },
    "update": {"choices": list(UPDATES)},
    "heal": {
        "metavar": "NAMES",
        "help": f"after the method, heal the factors: {', '.join(healer_names())} or "
        "several in order (block,kd); none by default",
    },
    "heal_options": {"flag": "--heal-option", "type": option_pair, "action": "append", "metavar": "NAME.KEY=VALUE"},
    "heal_calib": {"flag": "--heal-calib", "metavar": "SPEC"},
    "statistics_dir": {"metavar": "DIR"},
    "rank_multiple": {"type": positive, "metavar": "N"},
    "sequential": {"action": "store_true"},
    "device": {},
}
"""the other flags, by :class:`CompressionOptions` field"""


def add_parser(sub) -> None:
    c = sub.add_parser("compress", help="compress a model into a low-rank model folder")
    c.add_argument("model", help="model folder, hub id, .gguf file, or 'smollm2-135m'")
    add_fields(c, CompressionOptions, FLAGS)
    add_fields(c, CalibrationSettings, CALIBRATION_FLAGS, prefix="calib_")
    c.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    c.add_argument(
        "--densify",
        action="store_true",
        help="write a plain dense model (W' = B A) that any tool loads, instead of the low-rank one",
    )
    add_dtype(c)
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run that a kill or an interruption left beside --output (same command)",
    )
    c.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    c.set_defaults(run=run)


def options_from_args(a: argparse.Namespace) -> CompressionOptions:
    """The checked options of a parsed command line (fails before any model is loaded)."""
    if a.ratio == 0 and a.kv_ratio is None:
        raise SvdkitError("--ratio 0 compresses nothing: give a ratio in (0, 1), or --kv-ratio to compress only k/v")
    if a.densify and a.kv_ratio is not None:
        raise SvdkitError("--densify writes dense k_proj/v_proj, which have no latent to cache: drop one of them")
    calibration = CalibrationSettings(**fields_from_args(a, CalibrationSettings, CALIBRATION_FLAGS, "calib_"))
    return CompressionOptions(**fields_from_args(a, CompressionOptions, FLAGS), calibration=calibration)


def run(a: argparse.Namespace) -> None:
    start = time.perf_counter()
    a.device = distributed.setup(a.device)  # under torchrun: join the group, one GPU per process
    options = options_from_args(a)
    check_not_source(a.model, a.output)
    _check_resume(a)
    with group_owns(a.output):  # before anything at the output is looked at, let alone removed
        _run(a, options, start)


def _check_resume(a: argparse.Namespace) -> None:
    """--resume with nothing to resume: a finished output says so (not that it is 'not empty')."""
    out = Path(a.output)
    if a.resume and not partial_path(out).is_dir() and (out / "config.json").is_file():
        raise SvdkitError(
            f"--resume: {out} is complete already (no unfinished run is kept beside it): nothing to resume; "
            "pass --overwrite instead of --resume to compress again"
        )


def _run(a: argparse.Namespace, options: CompressionOptions, start: float) -> None:
    if not distributed.is_main():
        options = dataclasses.replace(options, progress=False)
    ratio = 0.0 if a.densify else a.ratio  # of the decoder layers' matrices removed from the output
    folder = local_folder(a.model)
    size = _element_bytes(folder, a.dtype) if folder is not None else 4
    estimate = dense_bytes(folder, ratio, size) if folder is not None else None
    out = prepare_output_dir(a.output, a.overwrite, size=estimate or 0)  # a folder's output, from its headers
    result, model, why = _streamed(a, folder, out, options) if folder is not None else (None, None, None)
    if result is None:
        result, model = _whole(a, folder, out, options, ratio, why)
    seconds = time.perf_counter() - start
    if not distributed.is_main():
        return
    _report(a, result, model, out, seconds)
    emit(
        {
            "output": str(out),
            "params": result.params_dense if a.densify else result.params,  # what the folder holds
            "params_dense": result.params_dense,
            "seconds": round(seconds, 3),
            **_device_summary(a.device),
        },
        a.json,
    )


def _device_summary(device) -> dict:
    """Where the work ran, and on CUDA the peak memory PyTorch allocated there (bytes)."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return {"device": str(dev)}
    return {"device": torch.cuda.get_device_name(dev), "peak_gpu_bytes": torch.cuda.max_memory_allocated(dev)}


def _element_bytes(folder: Path, dtype: str) -> int:
    """Bytes per element the output is written in."""
    if dtype == "auto":
        try:
            return Checkpoint(folder).main_dtype().itemsize
        except NotStreamable:  # no safetensors: loaded whole, in float32 unless its config says otherwise
            return 4
    return 4 if dtype == "float32" else 2


def _streamed(a: argparse.Namespace, folder: Path, out: Path, options: CompressionOptions):
    """(result, model skeleton, None) of a compression streamed layer by layer, or (None, None, why not) where
    it needs the whole model (said in one line)."""
    try:
        return (*compress_folder(folder, out, options, a.dtype, a.resume, a.overwrite, a.densify), None)
    except NotStreamable as e:
        if a.resume:
            raise SvdkitError(f"--resume continues a compression streamed layer by layer, but {e}") from e
        print(f"loading the whole model into memory: {e}", flush=True)
        return None, None, str(e)


def _whole(
    a: argparse.Namespace, folder: Path | None, out: Path, options: CompressionOptions, ratio: float, why: str | None
):
    """(result, model) of a compression of the model loaded whole (a hub id, a .gguf, or a plan that cannot
    stream: `why`), refused up front where the model and what its healing holds do not fit in memory."""
    if distributed.size() > 1:
        why = why or "the model is not a local folder of safetensors weights"
        raise SvdkitError(f"a run of several processes (torchrun) streams the model layer by layer, but {why}")
    if folder is not None:
        copies = 1 + sum(h.held(ratio) for h, _ in options.resolved.heal if h.held is not None)
        check_fits_memory(folder, _element_bytes(folder, a.dtype), why or "it", copies)
    model, tok = load_model(a.model, dtype=a.dtype)
    plan = make_plan(model, options, tokenizer=tok)
    targets = sum(m * n for m, n in plan.shapes.values())
    size = next(model.parameters()).element_size()
    check_free_space(out.parent, size * int(count_parameters(model) - ratio * targets))  # any model, measured
    if plan.dense_pass:
        check_spill_space(options.statistics_dir, spill_bytes(plan.shapes, plan.needs))
    result = run_plan(plan, model, tok)
    model.to("cpu")
    if a.densify:
        densify(model, tok, out, overwrite=a.overwrite, inplace=True)
    else:
        save(model, tok, out, overwrite=a.overwrite)
    return result, model


def _report(a: argparse.Namespace, result, model, out, seconds: float) -> None:
    t = result.timings
    if result.quantized:
        size = f"{result.params:,} parameters besides the quantized base (dense {result.params_dense:,})"
    else:
        size = (
            f"{result.params_dense:,} -> {result.params:,} parameters "
            f"({100 * (1 - result.params / result.params_dense):.1f}% fewer)"
        )
    how = compression_words({"ratio": result.ratio, "quantized": result.quantized})
    print(
        f"{a.method}, {how}: {size}, {len(result.ranks)} low-rank matrices, {len(result.dense_kept)} kept dense\n"
        f"time {seconds:.1f}s (calibration {t['calibration']:.1f}s, decomposition {t['decomposition']:.1f}s, "
        f"allocation {t['allocation']:.2f}s); written to {out}" + (" (densified)" if a.densify else "")
    )
    if a.kv_ratio is not None:
        sized, problem = f"k_proj/v_proj at the ranks of a {a.kv_ratio:.0%} smaller KV cache", latent_kv_problem(model)
        print(
            f"{sized}: svdkit generate {out} --kv-cache latent"
            if problem is None
            else f"{sized}, but the latent cache cannot serve this model ({problem}): its cache stays ordinary"
        )
    if result.training:
        print(f"training: {stage_line(result.training.record())}")
        _extra(out, CURVE_FILE, finite(result.training.curves.get("curve", [])), "training curve")
    for name, report in result.healing.items():
        print(f"healing {name}: {stage_line(report.record())}")
    if result.healing:
        _extra(out, HEALING_FILE, {n: r.as_dict() for n, r in result.healing.items()}, "healing curves")
    _one_text_note(out)
    if get_allocator(a.allocation).per_matrix or result.training:
        print(rank_summary(result.ranks, result.dense_kept, _shapes(model, result)))
        for key, value in result.allocation.items():
            if key not in ("name", "config"):
                print(f"  {key}: {value}")


def _one_text_note(out: Path) -> None:
    """One line when every calibration window came from one real text (the default: Python's documentation):
    such a model can be many times dense perplexity outside that text's domain (README: "Which text")."""
    calibration = (read_svdkit_config(out) or {}).get("calibration") or {}
    sources = {p.get("source") for p in calibration.get("parts") or []}
    if len(sources) == 1 and SELF not in sources and "token ids" not in sources:
        print(
            f"note: calibrated on one text ({sources.pop()}); outside its domain perplexity can be many times "
            "dense: a mixture generalizes better (--calib with texts of your domains, e.g. a.txt:16,b.txt:16, "
            "or demo:16,self:16 with none; README: Which text)"
        )


def _extra(out: Path, name: str, data, what: str) -> None:
    """Write `data` as JSON to `name` in the finished output folder (curves: an extra beside the model)."""
    try:
        (out / name).write_text(json.dumps(data) + "\n")
    except OSError as e:
        raise SvdkitError(f"the model was written to {out}, but not its {what}: {e}") from e


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
