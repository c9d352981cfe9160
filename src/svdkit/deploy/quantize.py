"""Weight-only block quantization of an exported graph by ONNX Runtime's own quantizers.

Every MatMul with a constant weight W (K inputs x N outputs) becomes a MatMulNBits: `bits`-bit integers in
blocks of `block_size` along K, one float scale per block (and, for an asymmetric quantizer, a zero point).
Which integers, by `quantizer`:

- ``rtn``: round to nearest, symmetric (the zero point 2^(bits-1) implied); 4 or 8 bits;
- ``hqq``: Half-Quadratic Quantization (Badri & Shaji 2023): scales and float zero points fitted by
  half-quadratic splitting to an l_p (p < 1) error of the weights, no data; 4 bits;
- ``gptq``: GPTQ (Frantar et al. 2023, arXiv 2210.17323): columns quantized in order, each one's rounding
  error spread over the columns not yet quantized through the inverse of H = X X^T, the Gram matrix of the
  layer's inputs on calibration windows run through the graph; symmetric, 4 bits.

The input embedding E (V x H) is quantized too (``embedding=True``): a GatherBlockQuantized reads it in
MatMulNBits' own layout of E^T (uint8 blocks along H, the zero point 2^(bits-1) implied), so where the head
is tied to E and its MatMulNBits is symmetric, the Gather reads the head's very tensor: one copy on disk.
Otherwise E is quantized on its own, by round to nearest.

A model whose layers already carry a quantized base (``qlr``) has those bases written natively before this
quantization runs (:mod:`.bases`): they are MatMulNBits already, which it leaves as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.options import power_of_two
from ..errors import SvdkitError

__all__ = ["QUANTIZERS", "Quantization", "bytes_by_part", "quantize_graph"]

QUANTIZERS = ("rtn", "hqq", "gptq")


@dataclass(frozen=True)
class Quantization:
    """What :func:`quantize_graph` does: bits, block size, quantizer, and whether the embedding is quantized."""

    bits: int = 4
    block_size: int = 32
    quantizer: str = "rtn"
    embedding: bool = True

    def check(self) -> None:
        """Refuse what ONNX Runtime's quantizers cannot write, naming what to use instead."""
        if self.bits not in (4, 8):
            raise SvdkitError(f"weights are quantized to 4 or 8 bits, not {self.bits}")
        try:
            power_of_two(16)("the block size", self.block_size)
        except ValueError as e:
            raise SvdkitError(str(e)) from None
        if self.quantizer not in QUANTIZERS:
            raise SvdkitError(f"unknown quantizer '{self.quantizer}' (known: {', '.join(QUANTIZERS)})")
        if self.quantizer != "rtn" and self.bits != 4:
            raise SvdkitError(
                f"ONNX Runtime's {self.quantizer} quantizer writes 4-bit weights only: use int4, or rtn for int8"
            )


def _initializers(graph) -> dict:
    return {t.name: t for t in graph.initializer}


def _fold_transposes(graph) -> dict[str, str]:
    """Replace each Transpose of a weight (a tied lm_head: the embedding, transposed at run time) by the
    transposed weight, so the quantizer sees a constant MatMul weight; the original stays for its Gather.
    Returns {folded weight: the weight it transposes}."""
    from onnx import numpy_helper

    weights, folded = _initializers(graph), {}
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights]:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        value = numpy_helper.to_array(weights[node.input[0]]).transpose(perm)
        graph.initializer.append(numpy_helper.from_array(value.copy(), node.output[0]))
        graph.node.remove(node)
        folded[node.output[0]] = node.input[0]
    return folded


def _head(graph):
    """The MatMul (or MatMulNBits) that makes the logits, walking back over what follows it (soft-capping)."""
    made = {out: node for node in graph.node for out in node.output}
    node = made.get("logits")
    while node is not None and node.op_type not in ("MatMul", "MatMulNBits"):
        node = made.get(node.input[0]) if node.input else None
    return node


def _embedding(graph):
    """The Gather that reads the token embedding (a constant indexed by ``input_ids``), or None."""
    weights = _initializers(graph)
    gathers = (n for n in graph.node if n.op_type == "Gather" and n.input[0] in weights)
    return next((n for n in gathers if n.input[1] == "input_ids"), None)


def _config(q: Quantization, calibration: list[dict] | None):
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    if q.quantizer == "hqq":
        return mq.HQQWeightOnlyQuantConfig(block_size=q.block_size, bits=q.bits)
    if q.quantizer == "gptq":
        if not calibration:
            raise SvdkitError("the gptq quantizer needs calibration windows")
        return mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(calibration))
    return mq.DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=True, bits=q.bits)


class _Reader:
    """ONNX Runtime's calibration reader protocol over a list of graph inputs (GPTQ iterates over a copy)."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds

    def get_next(self):
        return None

    def __iter__(self):
        return iter(self.feeds)


def quantize_graph(model, q: Quantization, calibration: list[dict] | None = None):
    """`model` (an onnx ModelProto of an export) with every constant MatMul weight, and with ``q.embedding``
    the token embedding, block-quantized as `q` says; `calibration`: graph inputs for GPTQ."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q.check()
    folded = _fold_transposes(model.graph)
    head = _head(model.graph)
    tied_to = folded.get(head.input[1]) if head is not None else None
    quantizer = MatMulNBitsQuantizer(
        model, bits=q.bits, block_size=q.block_size, is_symmetric=True, algo_config=_config(q, calibration)
    )
    quantizer.process()
    model = quantizer.model.model
    if q.embedding:
        _quantize_embedding(model, q, tied_to)
    return model


def _quantize_embedding(model, q: Quantization, tied_to: str | None) -> None:
    """Replace the embedding's Gather by GatherBlockQuantized over E^T in MatMulNBits' layout (V, blocks,
    block bytes); a tied symmetric head's own tensor where there is one."""
    from onnx import helper, numpy_helper

    graph = model.graph
    gather = _embedding(graph)
    if gather is None:
        return
    weights, head, name = _initializers(graph), _head(graph), gather.input[0]
    hidden = int(numpy_helper.to_array(weights[name]).shape[1])
    if head is not None and head.op_type == "MatMulNBits" and tied_to == name and len(head.input) == 3:
        data, scales = head.input[1], head.input[2]
        rows, blocks = numpy_helper.to_array(weights[data]).shape[:2]
    else:
        from onnxruntime.quantization import matmul_nbits_quantizer as mq

        table = numpy_helper.to_array(weights[name]).astype(np.float32)
        config = mq.DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=True, bits=q.bits)
        packed, scale, _ = mq.DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(table.T))
        data, scales, (rows, blocks) = f"{name}_Q{q.bits}", f"{name}_scales", packed.shape[:2]
        graph.initializer.extend([numpy_helper.from_array(packed, data), numpy_helper.from_array(scale, scales)])
    out = gather.output[0]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([rows, blocks, 1], dtype=np.int64), f"{out}_scale_shape"),
            numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), f"{out}_shape"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), f"{out}_hidden"),
            numpy_helper.from_array(np.array([hidden], dtype=np.int64), f"{out}_hidden_end"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), f"{out}_axis"),
        ]
    )
    nodes = [
        helper.make_node("Reshape", [scales, f"{out}_scale_shape"], [f"{out}_scales"]),
        helper.make_node(
            "GatherBlockQuantized",
            [data, gather.input[1], f"{out}_scales"],
            [f"{out}_blocks"],
            domain="com.microsoft",
            bits=q.bits,
            block_size=q.block_size,
            gather_axis=0,
            quantize_axis=2,
        ),
        helper.make_node("Reshape", [f"{out}_blocks", f"{out}_shape"], [f"{out}_padded"]),
        # the last block of a row is padded where the block size does not divide the hidden size
        helper.make_node("Slice", [f"{out}_padded", f"{out}_hidden", f"{out}_hidden_end", f"{out}_axis"], [out]),
    ]
    at = list(graph.node).index(gather)
    graph.node.remove(gather)
    for k, node in enumerate(nodes):
        graph.node.insert(at + k, node)
    if not any(name in node.input for node in graph.node):
        graph.initializer.remove(weights[name])


def _nbytes(tensor) -> int:
    """Bytes of an initializer, read from its external-data record where it has one (no data loaded)."""
    from onnx import numpy_helper

    external = {e.key: e.value for e in tensor.external_data}
    if "length" in external:
        return int(external["length"])
    return len(tensor.raw_data) if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).nbytes


def bytes_by_part(model) -> dict[str, int]:
    """Bytes of the graph's weights by part: ``embedding`` (what the token Gather reads; a tied head's shared
    tensor counts here), ``head`` (what the logits' MatMul reads besides), ``layers`` (every other weight)."""
    graph = model.graph
    sizes = {t.name: _nbytes(t) for t in graph.initializer}
    gather = _embedding(graph) or next((n for n in graph.node if n.op_type == "GatherBlockQuantized"), None)
    head = _head(graph)
    embedding = set(gather.input[:1]) if gather is not None else set()
    if gather is not None and gather.op_type == "GatherBlockQuantized":
        made = {out: node for node in graph.node for out in node.output}
        embedding |= {gather.input[0], *made[gather.input[2]].input}
    head_inputs = set(head.input[1:]) - embedding if head is not None else set()
    parts = {"embedding": embedding, "head": head_inputs}
    out = {part: sum(sizes.get(n, 0) for n in names) for part, names in parts.items()}
    out["layers"] = sum(sizes.values()) - out["embedding"] - out["head"]
    return out
