"""The latent KV cache on SmolLM2-135M: cache bytes per token, perplexity and decode speed.

    SVDKIT_DATA=../shared/data python benchmarks/kv_cache.py [--kv-ratios 0.25 0.5 0.75] [--out docs/results/kv_cache]

Only k_proj / v_proj are compressed (svd-llm, ``ratio=0, kv_ratio=rho``), from one statistics pass on the
protocol's calibration windows (32 x 2048 WikiText-2 test tokens at seeded offsets from 150000). Each
model is evaluated on the protocol's perplexity windows, then decoded greedily (batch 1, exactly
--new-tokens tokens, median of 3 after a warm-up) after a short and a long prompt, with the ordinary
cache and with the latent one (a copy of the model, timed in alternation with the ordinary one so the
drift of a shared machine cancels); the cache bytes per token are measured from a real cache. The tokens
the two caches generate are compared after the long prompt.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

import svdkit
from svdkit.calibration.collect import collect_statistics
from svdkit.core.architecture import find_architecture
from svdkit.measure.speed import paired_speed
from svdkit.saved.kvcache import KV_TARGETS, enable_latent_kv_cache, kv_bytes_per_token
from svdkit.sources.text import calibration_windows, load_text, tokenize


def generate_ids(model, prompt: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(prompt[None], do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, prompt.numel() :].tolist()


def row(model, label: str, kv_ratio: float | None, wiki, ptb, a) -> dict:
    ev = dict(seqlen=a.seqlen, progress=False)
    r = {
        "label": label,
        "kv_ratio": kv_ratio,
        "params": svdkit.count_parameters(model),
        "wikitext2": svdkit.perplexity(model, None, wiki, max_windows=a.eval_windows, **ev).ppl,
        "ptb": svdkit.perplexity(model, None, ptb, max_windows=a.ptb_windows, **ev).ppl,
    }
    short, long = wiki[: a.short_prompt], wiki[: a.long_prompt]
    models = {"ordinary": model}
    if kv_ratio is not None:  # a copy with the latent cache, timed in alternation with the ordinary one
        models["latent"] = copy.deepcopy(model)
        enable_latent_kv_cache(models["latent"])
    speed = {
        key: paired_speed(models, prompt, a.new_tokens, prompt.numel(), only=("decode_tok_s",))
        for key, prompt in (("decode_short_tok_s", short), ("decode_long_tok_s", long))
    }
    for mode, m in models.items():
        r[mode] = {
            "kv_bytes_per_token": kv_bytes_per_token(m, short),
            **{key: speed[key][mode]["decode_tok_s"] for key in speed},
            "tokens": generate_ids(m, long, a.compare_tokens),
        }
        print(label, mode, {k: v for k, v in r[mode].items() if k != "tokens"}, flush=True)
    if kv_ratio is not None:
        r["same_tokens"] = r["latent"]["tokens"] == r["ordinary"]["tokens"]
    return r


def markdown(report: dict) -> str:
    dense = report["rows"][0]["ordinary"]["kv_bytes_per_token"]
    lines = [
        "| model | KV cache | bytes/token | of dense | WikiText-2 ppl | PTB ppl | decode tok/s "
        f"(prompt {report['settings']['short_prompt']}) | decode tok/s (prompt {report['settings']['long_prompt']}) "
        "| same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        for mode in ("ordinary", "latent"):
            if mode not in r:
                continue
            m = r[mode]
            name = "dense" if r["kv_ratio"] is None else f"k/v low-rank, KV reduction {r['kv_ratio']:.0%}"
            same = "" if mode == "ordinary" or "same_tokens" not in r else ("yes" if r["same_tokens"] else "NO")
            lines.append(
                f"| {name} | {mode} | {m['kv_bytes_per_token']:,.0f} | {m['kv_bytes_per_token'] / dense:.0%} | "
                f"{r['wikitext2']:.2f} | {r['ptb']:.2f} | {m['decode_short_tok_s']:.1f} | "
                f"{m['decode_long_tok_s']:.1f} | {same} |"
            )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--kv-ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--method", default="svd-llm")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--ptb-windows", type=int, default=8)
    p.add_argument("--short-prompt", type=int, default=32)
    p.add_argument("--long-prompt", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--compare-tokens", type=int, default=48)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    a = p.parse_args()

    torch.manual_seed(0)
    data = Path(a.data_dir)
    model, tok = svdkit.load_model("smollm2-135m")
    wiki = tokenize(tok, load_text(data / "wikitext-2-raw" / "wiki.test.raw"))
    ptb = tokenize(tok, load_text(data / "ptb" / "ptb.valid.txt"))
    windows = calibration_windows(wiki, a.calib_samples, a.seqlen, 150_000, 0)
    t = time.perf_counter()
    arch = find_architecture(model, KV_TARGETS)
    needs = svdkit.get_method(a.method).requires
    stats = collect_statistics(model, arch, windows, needs, torch.device("cpu"), progress=True)
    print(f"statistics of {len(stats)} k/v matrices in {time.perf_counter() - t:.0f}s", flush=True)
    rows = [row(model, "dense", None, wiki, ptb, a)]
    for rho in a.kv_ratios:
        work, _ = svdkit.load_model("smollm2-135m", progress=False)
        res = svdkit.compress(
            work, tok, method=a.method, ratio=0, kv_ratio=rho, statistics=stats, device="cpu", progress=False
        )
        r = row(work, f"kv {rho}", rho, wiki, ptb, a)
        r["ranks"] = sorted(set(res.ranks.values()))
        rows.append(r)
    report = {
        "settings": {k: v for k, v in vars(a).items() if k != "out"},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    table = markdown(report)
    print(table)
    if a.out:
        Path(a.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
        Path(a.out + ".md").write_text(f"Command: `{report['command']}`\n\nMachine: {report['machine']}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
