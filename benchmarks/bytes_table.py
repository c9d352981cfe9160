"""The bytes track's rows and table, shared by quant_baselines.py, llamacpp_baselines.py and qlr_sweep.py: one
row per model with its bytes by part, the three domains' perplexity, generality, zero-shot mean and decode
speed paired with the run's reference."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from svdkit.measure.scorecard import generality, scorecard
from svdkit.measure.speed import paired_speed

HERE = Path(__file__).resolve().parent


def arguments(doc: str, out: str, configs: list[str]) -> argparse.ArgumentParser:
    """The options every baseline script takes: data, output folder, rows, and which rows get zero-shot."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--out", default=str(HERE.parent / "docs" / "results" / out))
    p.add_argument("--configs", nargs="+", default=configs)
    p.add_argument("--zero-shot", type=int, default=250, help="documents per zero-shot task (0: none)")
    p.add_argument("--zero-shot-configs", nargs="*", help="the rows that get zero-shot scores (default: every row)")
    p.add_argument("--redo", nargs="*", default=[], help="rows measured again, replacing the stored ones")
    return p


def stored_rows(out: Path, redo: list[str]) -> dict[str, dict]:
    """The rows of an earlier run kept in OUT/results.json (a rerun resumes), but those to `redo`."""
    path = out / "results.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    return {r["name"]: r for r in rows if r["name"] not in redo}


def scored_row(name: str, model, sizes: tuple[int, dict], tok, tokens, settings, reference: tuple, data_dir) -> dict:
    """One row: `sizes` (bytes, bytes by part), the scorecard's perplexities and zero-shot mean, and batch-1
    decode tokens/s paired with `reference` = (its name, its model) in the same runtime."""
    card = scorecard(model, tok, settings, data_dir=data_dir, tokens=tokens)
    zs = card.get("zero_shot") or {}
    return {
        "name": name,
        "bytes": sizes[0],
        "bytes_by_part": sizes[1],
        "ppl": card["ppl"],
        "zero_shot_mean": zs.get("mean"),
        "zero_shot_stderr": zs.get("mean_stderr"),
        **paired_decode(name, model, reference, tokens),
    }


def paired_decode(name: str, model, reference: tuple, tokens) -> dict[str, float]:
    """Batch-1 decode tokens/s (64 tokens after a 32-token prompt, median of 3), and its ratio to `reference`
    = (its name, its model) measured in turn with it."""
    ref_name, ref = reference
    models = {ref_name: ref} if name == ref_name else {ref_name: ref, name: model}
    speed = paired_speed(models, tokens["wikitext2"][:2048], new_tokens=64, prompt=32, only=("decode_tok_s",))
    tok_s = speed[name]["decode_tok_s"]
    return {"decode_tok_s": tok_s, f"decode_vs_{ref_name.lower()}": tok_s / speed[ref_name]["decode_tok_s"]}


def ordered(rows: dict[str, dict], configs: list[str]) -> list[dict]:
    """The rows in `configs`' order, any others after them by name."""
    return [rows[c] for c in configs + sorted(set(rows) - set(configs)) if c in rows]


def markdown(rows: list[dict], dense_ppl: dict, command: str, machine: str, ratio: tuple[str, str]) -> str:
    """The table; `ratio` is (row key, column title) of the decode ratio to the run's paired reference."""
    mb = 1e6
    key, title = ratio
    lines = [
        f"`{command}` ({machine})",
        "",
        "| model | MB on disk | embedding MB | head MB | layers MB | WikiText-2 | PTB | Python docs | generality "
        f"| zero-shot mean | decode tok/s | {title} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, parts = r["ppl"], r["bytes_by_part"]
        zs = "" if r["zero_shot_mean"] is None else f"{100 * r['zero_shot_mean']:.1f}"
        lines.append(
            f"| {r['name']} | {r['bytes'] / mb:.1f} | {parts['embedding'] / mb:.1f} | {parts['head'] / mb:.1f} | "
            f"{parts['layers'] / mb:.1f} | {p['wikitext2']:.2f} | {p['ptb']:.2f} | {p['pydoc']:.2f} | "
            f"{generality(p, dense_ppl):.3f} | {zs} | {r['decode_tok_s']:.1f} | {r[key]:.2f} |"
        )
    return "\n".join(lines) + "\n"
