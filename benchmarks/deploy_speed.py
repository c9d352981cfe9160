"""Dense against compressed in PyTorch and in ONNX Runtime, timed side by side; and the bytes track.

    python benchmarks/deploy_speed.py --compressed DIR [DIR ...] [--dense smollm2-135m] [--work WORK]
        [--data-dir ../shared/data] [--weights int8 int4] [--out PREFIX]

Every folder (and the dense model) is exported once to WORK/<name>-onnx (reused when there). Speed: one
:func:`svdkit.measure.speed.paired_speed` per compressed folder over four models (dense and compressed, torch
and ONNX Runtime) timed in alternation: a prefill of 2048 tokens as ``generate`` runs it (the cache filled, the last
position's logits only, in both runtimes) and batch-1 greedy decode of 128
tokens after a 32-token prompt, medians of 3. The bytes track (--weights): the dense model and each folder
exported with int8 / int4 weights, bytes on disk and WikiText-2 perplexity (first --windows windows of 2048)
in ONNX Runtime. Prints markdown tables; --out writes PREFIX.json and PREFIX.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

import svdkit
from svdkit.deploy.onnx import VERSION
from svdkit.deploy.runtime import OnnxCausalLM, is_onnx_folder, read_manifest
from svdkit.measure.speed import paired_speed
from svdkit.sources.text import source_tokens


def exported(spec: str, work: Path, weights: str = "float32") -> Path:
    name = Path(spec).name + ("" if weights == "float32" else f"-{weights}")
    out = work / f"{name}-onnx"
    manifest = read_manifest(out) if is_onnx_folder(out) else {}
    stale = manifest.get("version", 1) < VERSION or (weights != "float32" and "quantization" not in manifest)
    if not manifest or stale:  # older: every logit, or quantized weights with a float32 embedding
        model, tok = svdkit.load_model(spec, dtype="float32")
        svdkit.export_onnx(model, tok, out, weights=weights, source=spec, overwrite=True)
    return out


def speed_rows(dense: str, folders: list[str], work: Path, ids: torch.Tensor) -> list[dict]:
    dense_torch, _ = svdkit.load_model(dense, dtype="float32")
    dense_onnx = OnnxCausalLM(exported(dense, work))
    rows = []
    for folder in folders:
        comp_torch, _ = svdkit.load_model(folder, dtype="float32")
        models = {
            "dense torch": dense_torch,
            "compressed torch": comp_torch,
            "dense onnxruntime": dense_onnx,
            "compressed onnxruntime": OnnxCausalLM(exported(folder, work)),
        }
        speed = paired_speed(models, ids, new_tokens=128, prompt=32, only=("prefill_tok_s", "decode_tok_s"))
        ratio = comp_torch.config.svdkit["ratio"]
        for runtime in ("torch", "onnxruntime"):
            c, d = speed[f"compressed {runtime}"], speed[f"dense {runtime}"]
            rows.append(
                {
                    "folder": folder,
                    "ratio": ratio,
                    "runtime": runtime,
                    **{f"dense_{k}": v for k, v in d.items()},
                    **{f"compressed_{k}": v for k, v in c.items()},
                    "prefill_vs_dense": c["prefill_tok_s"] / d["prefill_tok_s"],
                    "decode_vs_dense": c["decode_tok_s"] / d["decode_tok_s"],
                    "decode_vs_dense_torch": c["decode_tok_s"] / speed["dense torch"]["decode_tok_s"],
                }
            )
            print(rows[-1], flush=True)
    return rows


def bytes_rows(specs: list[str], work: Path, weights: list[str], tokens: torch.Tensor, windows: int) -> list[dict]:
    rows = []
    for spec in specs:
        for w in ["float32", *weights]:
            folder = exported(spec, work, w)
            manifest = json.loads((folder / "svdkit_onnx.json").read_text())
            ppl = svdkit.perplexity(OnnxCausalLM(folder), source=tokens, seqlen=2048, max_windows=windows).ppl
            rows.append({"model": spec, "weights": w, "bytes": manifest["bytes"], "wikitext2": ppl})
            print(rows[-1], flush=True)
    return rows


def markdown(speed: list[dict], sizes: list[dict], command: str) -> str:
    lines = [f"command: `{command}`", f"machine: {platform.machine()} {torch.get_num_threads()} threads", ""]
    if speed:
        lines += [
            "| folder | ratio | runtime | prefill tok/s dense | compressed | vs dense | decode tok/s dense "
            "| compressed | vs dense | vs dense torch |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in speed:
            lines.append(
                f"| {Path(r['folder']).name} | {r['ratio']} | {r['runtime']} | {r['dense_prefill_tok_s']:.0f} | "
                f"{r['compressed_prefill_tok_s']:.0f} | {r['prefill_vs_dense']:.2f}x | {r['dense_decode_tok_s']:.1f} | "
                f"{r['compressed_decode_tok_s']:.1f} | {r['decode_vs_dense']:.2f}x | "
                f"{r['decode_vs_dense_torch']:.2f}x |"
            )
    if sizes:
        lines += ["", "| model | weights | bytes on disk | WikiText-2 ppl |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['weights']} | {r['bytes']:,} | {r['wikitext2']:.2f} |" for r in sizes]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compressed", nargs="+", required=True)
    p.add_argument("--dense", default="smollm2-135m")
    p.add_argument("--work", default="deploy-work")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--weights", nargs="*", default=[], choices=("int8", "int4"))
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--out")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    _, tok = svdkit.load_model(a.dense)
    os.environ.setdefault("SVDKIT_DATA", a.data_dir)
    tokens = source_tokens(tok, "wikitext2")
    speed = [] if a.no_speed else speed_rows(a.dense, a.compressed, work, tokens[:2048])
    sizes = bytes_rows([a.dense, *a.compressed], work, a.weights, tokens, a.windows) if a.weights else []
    report = markdown(speed, sizes, "python " + " ".join(sys.argv))
    print(report)
    if a.out:
        Path(f"{a.out}.json").write_text(json.dumps({"speed": speed, "bytes": sizes}, indent=1))
        Path(f"{a.out}.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
