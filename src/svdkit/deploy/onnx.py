"""Export a causal LM, compressed or dense, as one ONNX graph with a KV cache that ONNX Runtime runs.

The graph is traced by transformers' own exporter (``transformers.exporters``: ``torch.export`` then
``torch.onnx``, with its patches for the model families): its multi-token decode component, which serves a
prompt on an empty cache and each decode step on the grown one, so the weights are stored once. A low-rank
layer y = B (A x) + b becomes two MatMuls. The graph takes the positions whose logits it computes
(transformers' ``logits_to_keep`` as an index tensor): every position for perplexity, only the last for a
generation prefill, which so skips the vocabulary projection of the rest of the prompt.
``weights="int8"|"int4"`` then quantizes every MatMul's constant weight, dense matrices and factors alike, and
the token embedding, with ONNX Runtime's weight-only block quantizers (:mod:`.quantize`: MatMulNBits and
GatherBlockQuantized; round to nearest, HQQ or GPTQ; blocks of 32 by default). Before anything is written, the
export is run once against the torch model: a float32 graph whose logits differ by more than 1e-3 relative is refused.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..core.atomic import atomic_write
from ..core.disk import make_ordinary
from ..core.lowrank import count_parameters
from ..errors import SvdkitError
from ..saved.card import model_card
from ..saved.folder import write_metadata
from ..version import __version__
from .bases import native_bases, traced_as_float
from .quantize import Quantization, bytes_by_part, quantize_graph
from .runtime import KEEP, MANIFEST, OnnxCausalLM, prefill_feeds

__all__ = ["VERSION", "WEIGHTS", "export_onnx", "onnx_bytes"]

VERSION = 2
"""of the manifest: 2 since the graph takes ``logits_to_keep`` (a version-1 graph computes every position's)"""

WEIGHTS = ("float32", "int8", "int4")
GRAPH = "model.onnx"
TOLERANCE = 1e-3
"""largest relative difference of the float32 graph's logits from torch's accepted at export"""


def _exporter():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
        from transformers.exporters import OnnxConfig, OnnxExporter
        from transformers.exporters.utils import decompose_for_generation, onnx_inputs
    except ImportError as e:
        raise SvdkitError(
            f"the ONNX export needs onnx, onnxruntime, onnxscript and transformers>=5.24 ({e}): "
            "pip install 'svdkit[onnx]'"
        ) from None
    return OnnxExporter, OnnxConfig, decompose_for_generation, onnx_inputs


def _trace(model, sample: torch.Tensor):
    """(onnx_ir program, {cache input name: manifest entry}) of the model's multi-token decode graph."""
    OnnxExporter, OnnxConfig, decompose, onnx_inputs = _exporter()
    inputs = {"input_ids": sample, "attention_mask": torch.ones_like(sample)}
    submodel, forward_inputs = decompose(model, inputs, multi_token_decode=True)["decode"]
    # which positions get logits: every one for perplexity, the last for a generation prefill (a 1-D index
    # tensor, so the graph takes it as an input of its own dynamic length)
    forward_inputs = {**forward_inputs, KEEP: torch.arange(forward_inputs["input_ids"].shape[1])}
    exporter = OnnxExporter()
    with _chatter():
        program, _ = exporter.export_program(submodel, forward_inputs, OnnxConfig(dynamic=True))
    names = [v.name for v in program.graph.inputs if v.name.startswith("input.cache.")]
    cache = {}
    for name, leaf in onnx_inputs(names, forward_inputs).items():
        dtype = str(leaf.dtype).removeprefix("torch.")
        if leaf.dim() == 4:  # keys / values: (batch, heads, tokens, head dim), empty along tokens
            cache[name] = {"shape": [1, leaf.shape[1], 0, leaf.shape[3]], "dtype": dtype}
        else:  # a scalar of the cache's state (a sliding window's size): kept as traced
            cache[name] = {"value": leaf.tolist(), "dtype": dtype}
    missing = [v.name for v in program.graph.inputs if v.name not in {"input_ids", "position_ids", KEEP, *cache}]
    if missing:
        raise SvdkitError(f"the traced graph takes inputs svdkit does not feed ({missing}): this model can't export")
    return exporter, program, cache


@contextmanager
def _chatter() -> Iterator[None]:
    """The exporter's progress lines (printed to standard output) go to standard error where logging is on (the
    Python API, ``--verbose``), and nowhere where the command line keeps other libraries quiet."""
    printed = io.StringIO()
    with redirect_stdout(printed):
        yield
    if logging.root.manager.disable < logging.WARNING:
        sys.stderr.write(printed.getvalue())


def _rewrite(folder: Path, bases: dict, q: Quantization | None, calibration: list[dict] | None) -> None:
    """``folder/model.onnx`` rewritten in place: traced quantized bases as MatMulNBits (:func:`.bases.native_bases`),
    then the rest quantized as `q` says (:func:`.quantize.quantize_graph`)."""
    import onnx

    path = folder / GRAPH
    model = onnx.load(path)
    native_bases(model, bases)
    if q is not None:
        model = quantize_graph(model, q, calibration)
    for file in (path, folder / f"{GRAPH}.data"):
        file.unlink(missing_ok=True)
    onnx.save_model(model, path, save_as_external_data=True, location=f"{GRAPH}.data")
    for file in (path, folder / f"{GRAPH}.data"):
        make_ordinary(file)


def _parts(folder: Path) -> dict[str, int]:
    import onnx

    return bytes_by_part(onnx.load(folder / GRAPH, load_external_data=False))


def _check(folder: Path, model, sample: torch.Tensor, weights: str) -> float:
    """Largest |logit difference| / largest |logit| between ONNX Runtime and torch on `sample`; refused above
    the tolerance for a float32 graph."""
    with torch.no_grad():
        want = model(input_ids=sample).logits.float()
    got = OnnxCausalLM(folder)(sample).logits
    diff = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    if weights == "float32" and not diff <= TOLERANCE:
        raise SvdkitError(
            f"the exported graph's logits differ from the torch model's by {diff:.2e} (relative; at most "
            f"{TOLERANCE:g} expected): the export is wrong for this model, so nothing was written"
        )
    return diff


def onnx_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the graph and its weights on disk."""
    return sum(f.stat().st_size for f in Path(folder).glob(f"{GRAPH}*"))


def export_onnx(
    model,
    tokenizer,
    path: str | os.PathLike,
    weights: str = "float32",
    source: str = "",
    overwrite: bool = False,
    quantization: Quantization | None = None,
    calibration: torch.Tensor | None = None,
) -> dict:
    """Write `model` (a torch causal LM, compressed or dense) to the folder `path` as an ONNX export:
    ``model.onnx`` (+ ``.data``), the manifest, config, tokenizer and a model card. Returns the manifest.
    int8 / int4 `weights` are quantized as `quantization` says (its bits set by `weights`; default round to
    nearest, blocks of 32, the embedding too); `calibration` (windows x tokens) feeds GPTQ."""
    if weights not in WEIGHTS:
        raise SvdkitError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    q = None
    if weights != "float32":
        q = replace(quantization or Quantization(), bits=8 if weights == "int8" else 4)
        q.check()
    _exporter()
    model = model.to("cpu", torch.float32).eval()
    vocab = model.config.get_text_config().vocab_size
    sample = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    check = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(1))
    pairs = None if q is None else (q.bits, q.block_size, q.quantizer)
    with traced_as_float(model, pairs) as bases:
        exporter, program, cache = _trace(model, sample)
    text = model.config.get_text_config()
    manifest = {
        "format": "svdkit-onnx",
        "version": VERSION,
        "graph": GRAPH,
        "weights": weights,
        "source": source,
        "svdkit": __version__,
        "parameters": count_parameters(model),
        "config": {"max_position_embeddings": getattr(text, "max_position_embeddings", None), "vocab_size": vocab},
        "cache": cache,
        "compression": getattr(model.config, "svdkit", None),
    }
    if q is not None:
        manifest["quantization"] = asdict(q)
    feeds = None
    if q is not None and calibration is not None:
        feeds = [prefill_feeds(row[None].numpy(), cache) for row in calibration]

    def write(tmp: Path) -> None:
        exporter.save_program(program, tmp / GRAPH)
        if bases or q is not None:
            _rewrite(tmp, bases, q, feeds)
        manifest["bytes_by_part"] = _parts(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # the runner of _check reads it
        diff = manifest["max_relative_logit_difference"] = _check(tmp, model, check, weights)
        manifest["bytes"] = onnx_bytes(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        write_metadata(model, tokenizer, tmp)
        measured = {"logits against the torch model": f"largest difference {diff:.1e} of the largest logit"}
        (tmp / "README.md").write_text(model_card({**manifest, "measured": measured}))

    atomic_write(Path(path), overwrite, write)
    return manifest
