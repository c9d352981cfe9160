"""The 4- and 8-bit models a user can make of the dense model without svdkit's compression, on the protocol.

    python benchmarks/quant_baselines.py [--data-dir ../shared/data] [--out docs/results/quant_baselines]
        [--configs float32 int4-rtn-b32 ...] [--zero-shot 250] [--zero-shot-configs float32 int4-gptq-b32 ...]
        [--gptq-calib wikitext2:3,ptb:3,demo:2]

ONNX Runtime's own weight-only quantizers (svdkit.deploy.quantize: round to nearest, HQQ, GPTQ; int4 and int8;
blocks of 32 and 128) on the dense SmolLM2-135M (float32), the token embedding quantized too (a tied head
shares its tensor), each exported by ``svdkit export``'s code into a temporary folder. Per row: bytes on disk
and by part (embedding, head, layers), the scorecard's perplexities (WikiText-2, PTB, Python docs; the
protocol's windows) and zero-shot mean (first --zero-shot documents per task; of the --zero-shot-configs
rows only, where given: lm-eval runs ONNX Runtime one sequence at a time, ~10 min a row on 2 cores), and
batch-1 decode tokens/s (64 tokens after a 32-token prompt, median of 3) paired with the float32 export.
GPTQ calibrates on --gptq-calib windows of --gptq-seqlen tokens drawn as the bench draws them (clear of
every evaluated window).
Rows already in OUT/results.json are kept (a rerun resumes; `--redo NAMES` measures them again); prints and
writes results.md.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch
from bytes_table import arguments, markdown, ordered, scored_row, stored_rows

import svdkit
from svdkit.bench.cells import protocol_spec
from svdkit.deploy.quantize import Quantization
from svdkit.deploy.runtime import OnnxCausalLM
from svdkit.measure.scorecard import ScorecardSettings, domain_tokens
from svdkit.sources.mixture import mixture_windows

HERE = Path(__file__).resolve().parent
CONFIGS = [
    "float32",
    "int8-rtn-b32",
    "int8-rtn-b128",
    "int4-rtn-b32",
    "int4-rtn-b128",
    "int4-hqq-b32",
    "int4-hqq-b128",
    "int4-gptq-b32",
    "int4-gptq-b128",
    "int4-rtn-b32-float-embedding",
]


def quantization(name: str) -> tuple[str, Quantization | None]:
    """('int4', Quantization(...)) of a row name WEIGHTS-QUANTIZER-bBLOCK[-float-embedding]."""
    if name == "float32":
        return "float32", None
    weights, quantizer, block, *rest = name.split("-")
    bits = 8 if weights == "int8" else 4
    return weights, Quantization(bits, int(block.removeprefix("b")), quantizer, embedding=not rest)


def measure(name: str, model, tok, tokens, settings, calib, reference, data_dir: str, work: Path) -> dict:
    weights, q = quantization(name)
    folder = work / name
    t = time.perf_counter()
    windows = calib if q is not None and q.quantizer == "gptq" else None
    manifest = svdkit.export_onnx(model, tok, folder, weights, "smollm2-135m", quantization=q, calibration=windows)
    export_s = time.perf_counter() - t
    sizes = (manifest["bytes"], manifest["bytes_by_part"])
    reference = ("float32", reference)
    row = scored_row(name, OnnxCausalLM(folder), sizes, tok, tokens, settings, reference, data_dir)
    return {**row, "quantization": manifest.get("quantization"), "export_s": export_s}


def main() -> None:
    p = arguments(__doc__, "quant_baselines", CONFIGS)
    p.add_argument("--gptq-calib", default="wikitext2:3,ptb:3,demo:2")
    p.add_argument("--gptq-seqlen", type=int, default=512)
    args = p.parse_args()
    os.environ["SVDKIT_DATA"] = args.data_dir
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = stored_rows(out, args.redo)
    model, tok = svdkit.load_model("smollm2-135m", dtype="float32")
    tokens = domain_tokens(tok, args.data_dir)
    no_tasks = ScorecardSettings(tasks=(), generation=False)
    settings = ScorecardSettings(limit=args.zero_shot, generation=False) if args.zero_shot else no_tasks
    scored = set(args.zero_shot_configs if args.zero_shot_configs is not None else ["float32", *args.configs])
    texts = {"wikitext2": tokens["wikitext2"], "ptb": tokens["ptb"], "demo": tokens["pydoc"]}
    spec = protocol_spec(args.gptq_calib, 150000)
    calib = mixture_windows(spec, None, args.gptq_seqlen, 150000, 0, tok, model, texts)
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    versions = f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {versions}"
    with tempfile.TemporaryDirectory(prefix="quant-baselines-") as tmp:
        work = Path(tmp)
        svdkit.export_onnx(model, tok, work / "reference")
        reference = OnnxCausalLM(work / "reference")
        for name in ["float32", *args.configs]:
            if name in rows:
                continue
            print(f"{name} ...", flush=True)
            how = settings if name in scored else no_tasks
            rows[name] = measure(name, model, tok, tokens, how, calib, reference, args.data_dir, work)
            print(json.dumps(rows[name]), flush=True)
            record = {"command": command, "machine": machine, "rows": ordered(rows, CONFIGS)}
            (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    dense = rows["float32"]["ppl"]
    text = markdown(ordered(rows, CONFIGS), dense, command, machine, ("decode_vs_float32", "vs float32"))
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
