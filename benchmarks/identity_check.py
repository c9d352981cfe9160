"""Does a refactoring change what svdkit computes? Digests of every saved tensor, record and curve over many
configurations, written before the change and compared after it.

    python benchmarks/identity_check.py --save before.json      # on the old code
    python benchmarks/identity_check.py --compare before.json   # on the new code: exit 1 on any difference

Each configuration compresses a random-weight 4-layer Llama (hidden 64, GQA) on fixed token ids, in memory
through :func:`svdkit.compress` or streamed from a saved folder through
:func:`svdkit.pipeline.streaming.compress_folder`: every method, every allocation, the update with and
without sequential calibration, the latent KV ranks, each healer, SoCo, densified and resumed streams. The
digest of a configuration is the sha256 of every tensor of the result (the model's state dict, or every
tensor of the written shards) and of its records (the result, the saved config's svdkit record), with
times left out. CPU, float32 and float64, one thread: bit-identical runs give identical digests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

TIMES = ("timings", "passes", "elapsed")
"""keys of records left out (with any key that names seconds or ends in _s): times differ between runs"""


def _model(seed: int = 0):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _tokenizer():
    """A byte-level BPE tokenizer trained on a pangram (offline; a streamed folder needs one)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    text = "The quick brown fox jumps over the lazy dog. Sphinx of black quartz, judge my vow. " * 40
    bpe.train_from_iterator([text], vocab_size=320, min_frequency=1, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def _tokens(n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, 320, (37,), generator=g)
    ids = motif.repeat(n // 37 + 1)[:n].clone()
    noise = torch.rand(n, generator=g) < 0.3
    ids[noise] = torch.randint(0, 320, (int(noise.sum()),), generator=g)
    return ids


BLOCK = {"block.max_steps": 3, "block.every": 1}
KD = {"kd.max_steps": 3, "kd.seqlen": 16, "kd.every": 1}
HEAL = {**BLOCK, **KD}
SOCO = {"steps": 4, "seqlen": 16, "eval_windows": 2, "every": 2}

MEMORY: dict[str, dict] = {
    "svd": dict(method="svd"),
    "fwsvd": dict(method="fwsvd"),
    "asvd": dict(method="asvd"),
    "svd-llm": dict(method="svd-llm"),
    "svd-llm-0.6": dict(method="svd-llm", ratio=0.6),
    "svd-llm-v2": dict(method="svd-llm-v2"),
    "nsvd": dict(method="nsvd"),
    "nsvd2": dict(method="nsvd2"),
    "svd-llm-sequential": dict(method="svd-llm", sequential=True),
    "svd-lstsq": dict(method="svd", update="lstsq"),
    "svd-llm-lstsq-sequential": dict(method="svd-llm", update="lstsq", sequential=True),
    "svd-llm-v2alloc": dict(method="svd-llm", allocation="v2"),
    "svd-llm-v2alloc-sequential": dict(method="svd-llm", allocation="v2", sequential=True),
    "svd-llm-sensitivity": dict(method="svd-llm", allocation="sensitivity", allocation_options={"seqlen": 16}),
    "asvd-sensitivity": dict(method="asvd", allocation="sensitivity", allocation_options={"seqlen": 16}),
    "svd-llm-kv": dict(method="svd-llm", kv_ratio=0.5),
    "kv-only": dict(method="svd-llm", ratio=0.0, kv_ratio=0.5),
    "svd-llm-rank1": dict(method="svd-llm", rank_multiple=1),
    "heal-block": dict(method="svd-llm", heal="block", heal_options=BLOCK),
    "heal-kd": dict(method="svd-llm", heal="kd", heal_options=KD),
    "heal-block-kd": dict(method="svd-llm", heal="block,kd", heal_options=HEAL),
    "heal-block-sequential": dict(method="svd-llm", sequential=True, heal="block", heal_options=BLOCK),
    "heal-block-svd": dict(method="svd", heal="block", heal_options=BLOCK),  # no statistics: a walk to heal
    "heal-block-fwsvd": dict(method="fwsvd", heal="block,kd", heal_options=HEAL),  # statistics collected first
    "soco": dict(method="soco", method_options=SOCO),
    "soco-heal": dict(method="soco", method_options=SOCO, heal="block,kd", heal_options=HEAL),
}
STREAMED: dict[str, dict] = {
    "stream-svd": dict(method="svd"),
    "stream-svd-llm": dict(method="svd-llm"),
    "stream-svd-llm-sequential-lstsq": dict(method="svd-llm", update="lstsq", sequential=True),
    "stream-v2alloc": dict(method="svd-llm", allocation="v2"),
    "stream-asvd": dict(method="asvd"),
    "stream-kv": dict(method="svd-llm", kv_ratio=0.5),
    "stream-densify": dict(method="svd-llm", densify=True),
    "stream-bf16": dict(method="svd-llm", dtype="bfloat16"),
    "stream-heal-block": dict(method="svd-llm", heal="block", heal_options=BLOCK),
}


def _plain(value):
    """`value` with times left out, as JSON-able data."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not _is_time(k)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _tensor_digest(value)
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return str(value)


def _is_time(key: str) -> bool:
    return key in TIMES or "seconds" in key or key.endswith("_s")


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()[:16]


def _digest(tensors: dict[str, torch.Tensor], records: dict) -> dict:
    return {
        "tensors": {k: _tensor_digest(v) for k, v in sorted(tensors.items())},
        "records": json.loads(json.dumps(_plain(records), sort_keys=True, default=str)),
    }


def run_memory(name: str, kwargs: dict) -> dict:
    import svdkit

    model = _model()
    options = {"calib": _tokens(), "calib_samples": 6, "calib_seqlen": 32, "progress": False, "device": "cpu"}
    result = svdkit.compress(model, **{"ratio": 0.4, **options, **kwargs})
    record = getattr(model.config, "svdkit", None)
    return _digest(model.state_dict(), {"result": result.to_dict(), "config": record})


def run_streamed(name: str, kwargs: dict, work: Path) -> dict:
    from safetensors.torch import load_file

    from svdkit.pipeline.options import CalibrationSettings, CompressionOptions
    from svdkit.pipeline.streaming import compress_folder

    folder = work / "dense"
    if not folder.is_dir():
        _model().save_pretrained(folder)
        _tokenizer().save_pretrained(folder)
    kwargs = dict(kwargs)
    densify, dtype = kwargs.pop("densify", False), kwargs.pop("dtype", "auto")
    options = CompressionOptions(
        ratio=0.4,
        progress=False,
        device="cpu",
        calibration=CalibrationSettings(_tokens(), 6, 32, 0, 0),
        **kwargs,
    )
    out = work / name
    result, _ = compress_folder(folder, out, options, dtype=dtype, overwrite=True, densify=densify)
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    config = json.loads((out / "config.json").read_text())
    return _digest(tensors, {"result": result.to_dict(), "config": config.get("svdkit")})


def run_all(only: list[str] | None) -> dict:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in {**MEMORY, **STREAMED}.items():
            if only and name not in only:
                continue
            run = run_streamed if name in STREAMED else run_memory
            try:
                out[name] = run(name, kwargs, Path(tmp)) if run is run_streamed else run(name, kwargs)
            except Exception as e:  # a refusal is a result too: it must stay the same
                out[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: {len(out[name].get('tensors', {}))} tensors", file=sys.stderr)
    return out


def compare(before: dict, after: dict) -> list[str]:
    """One line per configuration whose digest changed."""
    lines = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a == b:
            continue
        if a is None:
            continue  # a configuration added since: nothing to compare with
        if b is None:
            lines.append(f"{name}: only before")
            continue
        if "error" in a or "error" in b:
            lines.append(f"{name}: {a.get('error', 'ran')} -> {b.get('error', 'ran')}")
            continue
        ta, tb = a["tensors"], b["tensors"]
        tensors = sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))
        records = "differ" if a["records"] != b["records"] else "equal"
        lines.append(f"{name}: {len(tensors)} tensors differ (e.g. {tensors[:3]}), records {records}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", help="write the digests here")
    g.add_argument("--compare", help="compare with the digests written here earlier")
    p.add_argument("--only", nargs="+", help="these configurations only")
    args = p.parse_args()
    digests = run_all(args.only)
    if args.save:
        Path(args.save).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
        print(f"{len(digests)} configurations -> {args.save}")
        return 0
    before = json.loads(Path(args.compare).read_text())
    if args.only:
        before = {k: v for k, v in before.items() if k in args.only}
    lines = compare(before, digests)
    for line in lines:
        print(line)
    print(f"{len(digests)} configurations: {len(lines)} differ")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
