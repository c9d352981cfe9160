"""The README.md model card every folder svdkit writes carries (Hugging Face's model-card convention: a YAML
header, then what the model is, how it was made, and how to load it in each runtime)."""

from __future__ import annotations

from collections import Counter

__all__ = ["model_card", "ranks_summary"]


def ranks_summary(ranks: dict[str, int]) -> str:
    """'q_proj 176 (30), k_proj 88 (30), ...': each projection type's ranks and how many matrices have them."""
    by_type: dict[str, Counter] = {}
    for name, rank in ranks.items():
        by_type.setdefault(name.rsplit(".", 1)[-1], Counter())[rank] += 1
    parts = []
    for kind, counts in by_type.items():
        ranks_text = ", ".join(f"{r} x{n}" if n > 1 else str(r) for r, n in sorted(counts.items()))
        parts.append(f"{kind} {ranks_text}")
    return "; ".join(parts)


def _header(record: dict | None, base: str) -> list[str]:
    tags = ["svdkit", "low-rank", "compressed"] if record else ["svdkit"]
    lines = ["---", "library_name: transformers", "tags:"] + [f"- {t}" for t in tags]
    if base and not base.startswith(("/", ".", "~")) and base.count("/") == 1:  # a hub id, not a local path
        lines.append(f"base_model: {base}")
    return lines + ["---", ""]


def _compression(record: dict | None) -> list[str]:
    if not record:
        return ["The dense model, not compressed (exported as it is, for comparison in the same runtime).", ""]
    lines = [
        f"- method: `{record.get('method')}` (allocation `{(record.get('allocation') or {}).get('name', 'uniform')}`)",
    ]
    if record.get("quantized"):
        q = record["quantized"]
        lines.append(f"- a {q['bits']}-bit quantized base (blocks of {q['block']}) under every low-rank pair")
    else:
        lines.append(f"- parameter ratio removed: {record.get('ratio')} of the compressible matrices")
    if record.get("heal"):
        lines.append(f"- healing: {', '.join(h.get('name', '?') for h in record['heal'])}")
    if record.get("ranks"):
        lines.append(f"- ranks: {ranks_summary(record['ranks'])}")
    if record.get("params_dense"):
        lines.append(f"- parameters of the dense model: {record['params_dense']:,}")
    return lines


def _usage(onnx: bool) -> list[str]:
    if onnx:
        return [
            "## Use",
            "",
            "```",
            "svdkit eval THIS_FOLDER            # perplexity, run by ONNX Runtime",
            "svdkit generate THIS_FOLDER --prompt 'Hello'",
            "```",
            "",
            "Or ONNX Runtime directly: `model.onnx` takes `input_ids` and `position_ids` (batch 1) and the cache",
            "inputs `input.cache.*` (zero tokens for a prompt; their shapes are in `svdkit_onnx.json`), and returns",
            "`logits` and `output.cache.*`, the next step's cache inputs.",
            "",
        ]
    return [
        "## Use",
        "",
        "```python",
        "import svdkit",
        "model, tokenizer = svdkit.load('THIS_FOLDER')",
        "# or without svdkit: transformers.AutoModelForCausalLM.from_pretrained('THIS_FOLDER', trust_remote_code=True)",
        "```",
        "",
        "`svdkit densify THIS_FOLDER --output DENSE` writes plain dense weights any tool loads;",
        "`svdkit export THIS_FOLDER --format onnx --output OUT` an ONNX Runtime graph.",
        "",
    ]


def model_card(facts: dict) -> str:
    """The card for a folder: `facts` holds ``compression`` (the svdkit record, or None for a dense model),
    ``source``, ``svdkit`` (version), ``parameters``, optionally ``bytes``, ``weights`` and ``graph`` (an ONNX
    export), and ``measured`` ({name: value}) when the command measured anything."""
    record = facts.get("compression")
    onnx = "graph" in facts
    title = "svdkit " + ("ONNX export" if onnx else "compressed model" if record else "model")
    lines = _header(record, facts.get("source", "")) + [f"# {title}", ""]
    lines += [f"Made by svdkit {facts.get('svdkit')} from `{facts.get('source') or 'a model'}`.", ""]
    lines += _compression(record)
    lines += [f"- parameters: {facts['parameters']:,}"] if facts.get("parameters") else []
    if onnx:
        lines += [f"- runtime: ONNX Runtime; weights {facts.get('weights', 'float32')}"]
    lines += [f"- bytes on disk: {facts['bytes']:,}"] if facts.get("bytes") else []
    for name, value in (facts.get("measured") or {}).items():
        lines.append(f"- {name}: {value}")
    return "\n".join(lines + [""] + _usage(onnx))
