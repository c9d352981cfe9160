"""The structural discovery of decoder layers and target projections."""

from __future__ import annotations

import pytest
from conftest import tiny_model
from torch import nn

from svdkit import SvdkitError, find_architecture

LLAMA_TARGETS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "qwen2", "mistral", "gemma", "gemma3", "qwen3-sliding"])
def test_finds_decoder_layers_and_projections(kind):
    model = tiny_model(kind)
    arch = find_architecture(model)
    assert arch.layers_path == "model.layers" and len(arch.layers) == 2
    assert sorted(arch.targets) == sorted(LLAMA_TARGETS)
    shapes = arch.shapes()
    assert shapes["model.layers.0.self_attn.k_proj"] == (32, 64)  # GQA: 2 KV heads of 16
    assert shapes["model.layers.1.mlp.down_proj"] == (64, 160)
    assert not any("embed" in n or "lm_head" in n for n in shapes)


def test_target_filter_and_unsupported_architectures():
    arch = find_architecture(tiny_model(), targets=["q_proj", "down_proj"])
    assert arch.targets == ["self_attn.q_proj", "mlp.down_proj"]
    with pytest.raises(SvdkitError, match="no linear layer"):
        find_architecture(tiny_model(), targets=["nonexistent"])
    conv = nn.Sequential(nn.Conv1d(3, 3, 1), nn.ReLU())
    with pytest.raises(SvdkitError, match="unsupported architecture Sequential: expected decoder blocks"):
        find_architecture(conv)
