import torch
from conftest import tiny_model
from torch import nn

from svdkit.core.fingerprint import model_fingerprint, saved_buffers
from svdkit.core.modeling_svdkit import QuantLowRankLinear


def _quantized_model() -> nn.Module:
    torch.manual_seed(0)
    layer = QuantLowRankLinear(32, 16, 4, bits=4, block=16)
    nn.init.normal_(layer.A)
    nn.init.normal_(layer.B)
    layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, dtype=torch.uint8))
    layer.scales.fill_(0.1)
    return nn.Sequential(layer)


def test_a_quantized_base_is_part_of_the_fingerprint():
    model = _quantized_model()
    before = model_fingerprint(model)
    assert {name for name, _ in saved_buffers(model)} == {"0.qweight", "0.scales"}
    model[0].qweight[0, 0, 0] ^= 1  # one code changes; the parameters do not
    assert model_fingerprint(model) != before
    model[0].qweight[0, 0, 0] ^= 1
    assert model_fingerprint(model) == before


def test_tied_weights_and_rotary_tables_are_no_saved_buffers():
    assert saved_buffers(tiny_model()) == []
