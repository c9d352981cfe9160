"""Block quantization in MatMulNBits' layout (the very bytes and scales ONNX Runtime's quantizer writes) and
GPTQ from a Gram matrix (rounding to nearest where the inputs are uncorrelated, a smaller output error where
they are not)."""

from __future__ import annotations

import pytest
import torch
from conftest import correlated_inputs

from svdkit.methods.blockquant import dequantize, gptq, pack, quantized_low_rank, round_to_nearest


@pytest.mark.parametrize(("bits", "block"), [(4, 32), (4, 128), (8, 32)])
def test_codes_and_layout_are_onnx_runtimes(bits, block):
    """Rounding to nearest gives ONNX Runtime's own MatMulNBits tensors, byte for byte (n = 80: a padded block)."""
    mq = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    W = torch.randn(24, 80, generator=torch.Generator().manual_seed(0))
    config = mq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits)
    packed, scales, _ = mq.DefaultWeightOnlyQuantizer(config).qbits_block_quant(W.T.contiguous().numpy())
    codes, ours = round_to_nearest(W, bits, block)
    assert torch.equal(pack(codes, bits, block), torch.from_numpy(packed).reshape(24, -1, block * bits // 8))
    assert torch.allclose(ours, torch.from_numpy(scales).reshape(24, -1))
    error = (dequantize(codes, ours, block) - W).abs()
    assert bool((error <= ours.abs().repeat_interleave(block, 1)[:, :80] + 1e-6).all())


def test_gptq_is_rounding_where_inputs_are_uncorrelated():
    W = torch.randn(16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    codes, scales = gptq(W, torch.eye(64, dtype=torch.float64) * 3.0)
    want, want_scales = round_to_nearest(W)
    assert torch.equal(codes, want) and torch.allclose(scales, want_scales)


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    """||(W - Q) X|| below rounding's, the same for any lazy batch size, a dead input harmless."""
    X = correlated_inputs(96, 2048, seed=2).double()
    X[5] = 0  # an input that never fires
    G = X @ X.T / X.shape[1]
    W = torch.randn(32, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def output_error(codes, scales):
        return float(torch.linalg.norm((W - dequantize(codes, scales)) @ X))

    rtn = output_error(*round_to_nearest(W))
    ours = output_error(*gptq(W, G))
    assert ours < 0.8 * rtn
    assert output_error(*gptq(W, G, lazy=32)) == pytest.approx(ours, rel=1e-6)
    codes, _ = gptq(W, G, bits=8)
    assert int(codes.min()) >= -128 and int(codes.max()) <= 127


def test_a_low_rank_correction_recovers_the_quantization_error():
    """Q + B A: the output error falls with the rank (to nothing at full rank), alternating never makes it
    worse, and GPTQ's base leaves less to correct than rounding's."""
    X = correlated_inputs(64, 4096, seed=4).double()
    G = X @ X.T / X.shape[1]
    W = torch.randn(48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def error(codes, scales, A, B):
        return float(torch.linalg.norm((W - dequantize(codes, scales) - B @ A) @ X))

    q_only = float(torch.linalg.norm((W - dequantize(*gptq(W, G))) @ X))
    errors = [error(*quantized_low_rank(W, G, k)) for k in (4, 16, 48)]
    assert q_only > errors[0] > errors[1] > errors[2] and errors[2] < 1e-6 * q_only
    once = error(*quantized_low_rank(W, G, 8, iterations=1))
    assert error(*quantized_low_rank(W, G, 8, iterations=3)) <= once + 1e-12
    rtn = error(*quantized_low_rank(W, G, 8, use_gptq=False))
    assert once < rtn
