"""svdkit's Q + LR (method ``qlr``) on SmolLM2-135M: settings chosen on validation windows, then scored like
the 4-bit baselines of quant_baselines.py.

    python benchmarks/qlr_sweep.py validate [--cells r32-b4-g32 ...] [--data-dir ../shared/data]
    python benchmarks/qlr_sweep.py score --cells r32-b4-g32 ... [--zero-shot 250]

A cell is ``rRANK-bBITS-gBLOCK[-QUANTIZER][-iITERATIONS]`` (quantizer gptq unless ``-rtn``; one iteration unless
``-iN``), or ``wBPW-bBITS-gBLOCK[...]``: the ranks chosen per matrix by the byte budget (``--allocation bytes``,
BPW bits per weight of the targets, bases and int4 pairs together; 5.0 is the bytes of ONNX Runtime's int4
blocks of 32), in multiples of 32. Every cell is calibrated on the windows ONNX Runtime's GPTQ and llama.cpp's
importance matrix get in the baselines (--calib, drawn as the bench draws them, clear of every evaluated
window), one statistics pass shared by all cells.

``validate`` prints, per cell, the perplexity on the protocol's validation windows (WikiText-2 tokens
[40960, 57344), PTB validation windows 8-15, the 8 Python-docs windows before its last 8) in torch, twice:
with the pair B A in float32, and with A and B rounded to int4 in blocks of 32 as ``svdkit export --weights
int4`` stores them; plus the bytes such an export takes by part (computed, not exported). Dense float32
and every target replaced by an int4 base alone (blocks of 32, no correction: svdkit's symmetric rounding or
GPTQ, qlr's bases; min-max rounding with an integer zero point or with a float offset, the grid of llama.cpp's
Q4_1, in which the protocol's model ships) are the first rows.

``score`` exports each cell with ``svdkit export --weights int4`` (bases as MatMulNBits of their own codes,
the pairs and the tied embedding round-to-nearest int4 in blocks of 32) and measures it as
quant_baselines.py measures a row: bytes by part, the three domains' perplexity, the zero-shot mean, and
batch-1 decode tokens/s paired with the dense int4-rtn-b32 export.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from bytes_table import scored_row, stored_rows

import svdkit
from svdkit.bench.cells import protocol_spec
from svdkit.core.architecture import find_architecture
from svdkit.core.modeling_svdkit import QuantLowRankLinear
from svdkit.deploy.quantize import Quantization
from svdkit.deploy.runtime import OnnxCausalLM
from svdkit.measure.scorecard import (
    PTB_VALIDATION,
    VALIDATION,
    ScorecardSettings,
    domain_tokens,
    generality,
)
from svdkit.methods.blockquant import block_bytes, dequantize, quantize, round_to_nearest
from svdkit.sources.mixture import mixture_windows

HERE = Path(__file__).resolve().parent
CELLS = ["r16-b4-g32", "r32-b4-g32", "r64-b4-g32", "r32-b4-g128", "r64-b4-g128", "r32-b4-g32-i3"]


def compressed(model, tok, cell: str, windows, stats):
    """A compressed copy of `model`: qlr with the cell's options, or (a cell ``svd-llm-RATIO``) svdkit's
    low-rank-only SVD-LLM at that parameter ratio, for the bytes plot."""
    m = copy.deepcopy(model)
    if cell.startswith("svd-llm-"):
        kw = {"method": "svd-llm", "ratio": float(cell.removeprefix("svd-llm-"))}
    elif cell.startswith("w"):  # ranks by the byte budget, in multiples of the pairs' int4 block
        budget = {"bits_per_weight": float(cell.split("-")[0][1:])}
        kw = {"method": "qlr", "method_options": options(cell), "allocation": "bytes", "allocation_options": budget}
        kw["rank_multiple"] = 32
    else:
        kw = {"method": "qlr", "method_options": options(cell)}
    svdkit.compress(m, tok, calib=windows, statistics=stats, progress=False, **kw)
    return m


def options(cell: str) -> dict:
    """qlr's options of a cell name (the rank only for an ``rRANK`` cell: a ``wBITS`` cell's come from its budget)."""
    parts = cell.split("-")
    out = {"bits": int(parts[1][1:]), "block": int(parts[2][1:])}
    if parts[0].startswith("r"):
        out["rank"] = int(parts[0][1:])
    for p in parts[3:]:
        if p in ("rtn", "gptq"):
            out["quantizer"] = p
        elif p.startswith("i"):
            out["iterations"] = int(p[1:])
    return out


def validation_tokens(tokens: dict[str, torch.Tensor], seqlen: int = 2048) -> dict[str, torch.Tensor]:
    """The protocol's validation windows of each domain (never its test windows)."""
    pydoc = tokens["pydoc"]
    return {
        "wikitext2": tokens["wikitext2"][VALIDATION[0] : VALIDATION[1]],
        "ptb": tokens["ptb"][PTB_VALIDATION[0] : PTB_VALIDATION[1]],
        "pydoc": pydoc[-16 * seqlen : -8 * seqlen],
    }


def validation_ppl(model, val: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: svdkit.perplexity(model, None, v, seqlen=2048, progress=False).ppl for k, v in val.items()}


def round_pairs(model, bits: int = 4, block: int = 32) -> None:
    """A and B of every QuantLowRankLinear rounded as the export's MatMulNBits stores them (blocks along
    each matrix's inputs: A's rows along n, B's rows along the rank)."""
    for m in model.modules():
        if isinstance(m, QuantLowRankLinear):
            for p in (m.A, m.B):
                p.data.copy_(dequantize(*round_to_nearest(p.data, bits, block), block))


def min_max(W: torch.Tensor, bits: int, block: int, float_offset: bool) -> torch.Tensor:
    """W rounded to `bits` in blocks of `block` between each block row's min and max: W ~ s q + o, q in
    [0, 2^bits - 1]; with `float_offset` the offset o is the row's min (llama.cpp's Q4_1 grid), else it is
    rounded to a whole number of steps (an integer zero point, as MatMulNBits' uint8 zero points store it)."""
    out, top = torch.empty_like(W), 2**bits - 1
    for start in range(0, W.shape[1], block):
        part = W[:, start : start + block]
        lo, hi = part.min(1, keepdim=True).values, part.max(1, keepdim=True).values
        if not float_offset:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        step = ((hi - lo) / top).clamp_min(1e-12)
        offset = lo if float_offset else -(-lo / step).round() * step
        out[:, start : start + block] = ((part - offset) / step).round().clamp(0, top) * step + offset
    return out


def base_only(model, arch, stats, quantizer: str, bits: int = 4, block: int = 32):
    """A copy of `model` with every target replaced by its quantized base alone (no correction): by svdkit's
    rtn or GPTQ (symmetric, qlr's bases), or min-max rounding with an integer zero point (``asym``) or a float
    offset (``minmax``)."""
    m = copy.deepcopy(model)
    for name in arch.shapes():
        w = m.get_submodule(name).weight
        W = w.data.to(torch.float64)
        if quantizer in ("asym", "minmax"):
            w.data.copy_(min_max(W, bits, block, quantizer == "minmax"))
            continue
        codes, scales = quantize(W, stats[name].gram_mean, bits, block, quantizer == "gptq")
        w.data.copy_(dequantize(codes, scales, block))
    return m


def export_bytes(model, arch, bits: int = 4, block: int = 32) -> dict[str, float]:
    """Bytes of an int4 export by part, computed: bases at their bits plus a float32 scale per block, pairs
    and the (tied) embedding round-to-nearest `bits` in blocks of `block` (padded blocks count)."""
    layers = 0.0
    for name in arch.shapes():
        m = model.get_submodule(name)
        if isinstance(m, QuantLowRankLinear):
            r = m.A.shape[0]
            layers += block_bytes(m.out_features, m.in_features, m.bits, m.block)
            layers += block_bytes(r, m.in_features, bits, block) + block_bytes(m.out_features, r, bits, block)
        else:
            layers += block_bytes(m.out_features, m.in_features, bits, block)
    emb = model.get_input_embeddings().weight
    norms = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    return {"embedding": block_bytes(*emb.shape, bits, block), "layers": layers + norms}


def validate(args, model, tok, tokens, stats, windows) -> None:
    arch = find_architecture(model)
    val = validation_tokens(tokens)
    out = Path(args.out)
    rows = json.loads((out / "validate.json").read_text()) if (out / "validate.json").is_file() else {}
    if "dense" not in rows:
        rows["dense"] = {"ppl": validation_ppl(model, val)}
    for quantizer in ("rtn", "gptq", "asym", "minmax"):
        if f"base-{quantizer}-b4-g32" not in rows:
            ppl = validation_ppl(base_only(model, arch, stats, quantizer), val)
            rows[f"base-{quantizer}-b4-g32"] = {"ppl": ppl, "ppl_float_pairs": ppl}
            print(f"base-{quantizer}-b4-g32", json.dumps(rows[f"base-{quantizer}-b4-g32"]), flush=True)
            (out / "validate.json").write_text(json.dumps(rows, indent=1) + "\n")
    dense = rows["dense"]["ppl"]
    for cell in args.cells:
        if cell in rows:
            continue
        t = time.perf_counter()
        m = compressed(model, tok, cell, windows, stats)
        row = {"compress_s": time.perf_counter() - t, "ppl_float_pairs": validation_ppl(m, val)}
        round_pairs(m)
        row["ppl"] = validation_ppl(m, val)
        row["bytes_by_part"] = export_bytes(m, arch)
        ranks = list(m.config.svdkit["ranks"].values())
        row["ranks"] = {"min": min(ranks), "mean": sum(ranks) / len(ranks), "max": max(ranks)}
        rows[cell] = row
        print(cell, json.dumps(row), flush=True)
        (out / "validate.json").write_text(json.dumps(rows, indent=1) + "\n")
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = [
        "Validation windows (WikiText-2 tokens [40960, 57344), PTB validation windows 8-15, the 8 Python-docs "
        "windows before its last 8), torch, float32 embedding.",
        f"`{command}` ({machine}; calibration: {args.calib} windows of {args.calib_seqlen}; rows of earlier runs kept)",
        "",
        "| cell | WikiText-2 | PTB | Python docs | vs dense | float pairs vs dense | layers MB | ranks min/mean/max |",
        "|---" * 8 + "|",
    ]
    for cell, r in rows.items():
        if cell == "dense":
            p = r["ppl"]
            lines.append(f"| dense float32 | {p['wikitext2']:.2f} | {p['ptb']:.2f} | {p['pydoc']:.2f} | 1 | | | |")
            continue
        p, f, k = r["ppl"], r["ppl_float_pairs"], r.get("ranks")
        ranks = f"{k['min']} / {k['mean']:.1f} / {k['max']}" if k else ""
        layers = f"{r['bytes_by_part']['layers'] / 1e6:.1f}" if "bytes_by_part" in r else ""
        lines.append(
            f"| {cell} | {p['wikitext2']:.2f} | {p['ptb']:.2f} | {p['pydoc']:.2f} | {generality(p, dense):.3f} | "
            f"{generality(f, dense):.3f} | {layers} | {ranks} |"
        )
    (out / "validate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def score(args, model, tok, tokens, stats, windows) -> None:
    out = Path(args.out)
    rows = stored_rows(out, args.redo)
    settings = ScorecardSettings(limit=args.zero_shot, generation=False)
    if not args.zero_shot:
        settings = ScorecardSettings(tasks=(), generation=False)
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    with tempfile.TemporaryDirectory(prefix="qlr-sweep-") as tmp:
        work = Path(tmp)
        svdkit.export_onnx(model, tok, work / "int4", "int4", "smollm2-135m", quantization=Quantization(4, 32))
        reference = ("int4", OnnxCausalLM(work / "int4"))
        for cell in args.cells:
            if cell in rows:
                continue
            m = compressed(model, tok, cell, windows, stats)
            manifest = svdkit.export_onnx(m, tok, work / cell, "int4", "smollm2-135m", quantization=Quantization(4, 32))
            sizes = (manifest["bytes"], manifest["bytes_by_part"])
            row = scored_row(cell, OnnxCausalLM(work / cell), sizes, tok, tokens, settings, reference, args.data_dir)
            rows[cell] = {**row, "options": None if cell.startswith("svd-llm-") else options(cell)}
            print(json.dumps(rows[cell]), flush=True)
            record = {"command": command, "machine": machine, "rows": list(rows.values())}
            (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=("validate", "score"))
    p.add_argument("--cells", nargs="+", default=CELLS)
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--out", default=str(HERE.parent / "docs" / "results" / "qlr"))
    p.add_argument("--calib", default="wikitext2:3,ptb:3,demo:2")
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--zero-shot", type=int, default=250, help="documents per zero-shot task (0: none)")
    p.add_argument("--redo", nargs="*", default=[], help="scored cells measured again, replacing the stored ones")
    args = p.parse_args()
    os.environ["SVDKIT_DATA"] = args.data_dir
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model, tok = svdkit.load_model("smollm2-135m", dtype="float32")
    tokens = domain_tokens(tok, args.data_dir)
    texts = {"wikitext2": tokens["wikitext2"], "ptb": tokens["ptb"], "demo": tokens["pydoc"]}
    windows = mixture_windows(protocol_spec(args.calib, 150000), None, args.calib_seqlen, 150000, 0, tok, model, texts)
    from svdkit.calibration.collect import collect_statistics

    stats = collect_statistics(model, find_architecture(model), windows, {"gram"}, torch.device("cpu"), progress=False)
    (validate if args.stage == "validate" else score)(args, model, tok, tokens, stats, windows)


if __name__ == "__main__":
    main()
