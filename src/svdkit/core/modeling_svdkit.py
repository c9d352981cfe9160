"""Loads an svdkit-compressed model with plain transformers: ``from_pretrained(folder, trust_remote_code=True)``.

svdkit (SVD-based compression of causal language models) saves this file into every compressed folder.
Each compressed projection W (m x n) is stored as factors A (k x n) and B (m x k) and computed as
y = B (A x) + b (with a block-quantized base Q under it where the record has ``quantized``: y = Q x + B (A x) + b).
config.json gives the model type ``svdkit_<base>``, so that transformers never loads
the folder as its dense base model (whose projections would be left randomly initialised); its
``auto_map`` names the classes below, and its ``"svdkit"`` record holds the ranks. The classes are the
base model's own with those projections swapped for :class:`LowRankLinear` before the weights load; a
folder whose weights do not match the record is refused. This file needs only torch and transformers.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

__all__ = [
    "PREFIX",
    "RECORD",
    "LowRankLinear",
    "QuantLowRankLinear",
    "build_classes",
    "swap_in",
    "summary",
    "loading_problems",
]

PREFIX = "svdkit_"
"""config.json's model_type is PREFIX + the base model's type"""
RECORD = "svdkit"
"""the config attribute (config.json key) holding the compression record: method, ratio, ranks, ..."""


class LowRankLinear(nn.Module):
    """y = B (A x) + bias, with A of shape (rank, in_features) and B of shape (out_features, rank)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """Build the layer from factors (A: k x n, B: m x k); dtype and device follow A."""
        if B.shape[1] != A.shape[0]:
            raise ValueError(f"factor shapes do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}")
        layer = cls(A.shape[1], B.shape[0], A.shape[0], bias is not None, A.device, A.dtype)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B.to(A))
            if bias is not None:
                layer.bias.copy_(bias.to(A))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """W' = B A (m x n)."""
        return self.B @ self.A

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={bias}"


class QuantLowRankLinear(LowRankLinear):
    """y = Q x + B (A x) + bias: a block-quantized base Q under the rank-k factors (svdkit's ``qlr``).

    Q is stored as runtimes store it (ONNX Runtime's MatMulNBits): ``qweight`` uint8 (out_features, blocks,
    block * bits / 8), unsigned codes c (two per byte, low nibble first, at 4 bits), and ``scales`` (out_features,
    blocks): Q = s (c - 2^(bits-1)), blocks of `block` along the inputs. Only A, B and the bias train.
    """

    def __init__(self, in_features, out_features, rank, bits: int, block: int, bias=False, device=None, dtype=None):
        super().__init__(in_features, out_features, rank, bias, device, dtype)
        if bits not in (4, 8):
            raise ValueError(f"the quantized base has 4 or 8 bits, got {bits}")
        self.bits, self.block = int(bits), int(block)
        blocks = -(-in_features // self.block)
        packed = (out_features, blocks, self.block * self.bits // 8)
        self.register_buffer("qweight", torch.zeros(packed, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, blocks, dtype=dtype, device=device))

    def codes(self) -> torch.Tensor:
        """The signed integers q of Q = s q (out_features x in_features, int16)."""
        packed = self.qweight.reshape(self.out_features, -1)
        if self.bits == 4:
            packed = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(self.out_features, -1)
        return (packed.to(torch.int16) - 2 ** (self.bits - 1))[:, : self.in_features]

    def quantized_weight(self) -> torch.Tensor:
        """Q (out_features x in_features), in the scales' dtype."""
        steps = self.scales.repeat_interleave(self.block, dim=1)[:, : self.in_features]
        return self.codes().to(self.scales.dtype) * steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), self.bias) + F.linear(F.linear(x, self.A), self.B)

    def dense_weight(self) -> torch.Tensor:
        """W' = Q + B A (m x n)."""
        return self.quantized_weight().to(self.A.dtype) + self.B @ self.A

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, block={self.block}"


def swap_in(model: nn.Module, ranks: dict, quantized: dict | None = None) -> None:
    """Replace each named nn.Linear by an (uninitialised) LowRankLinear of the given rank, in place; with
    `quantized` ({"bits": b, "block": n}, the record's), a QuantLowRankLinear."""
    for name, rank in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"the svdkit record names the module {name}, which this model does not have") from e
        if isinstance(old, nn.Linear):
            w, shape = old.weight, (old.in_features, old.out_features, int(rank))
            if quantized is None:
                new = LowRankLinear(*shape, old.bias is not None, w.device, w.dtype)
            else:
                bits, block = quantized["bits"], quantized["block"]
                new = QuantLowRankLinear(*shape, bits, block, old.bias is not None, w.device, w.dtype)
            model.set_submodule(name, new)


def summary(problems: list[str], shown: int = 3) -> str:
    """The first `shown` problems, and how many more."""
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def loading_problems(info: dict) -> list[str]:
    """What a from_pretrained loading report says is wrong: weights the model lacks, does not expect, or
    expects in another shape."""
    problems = [f"missing {k}" for k in sorted(info.get("missing_keys", ()))]
    problems += [f"unexpected {k}" for k in sorted(info.get("unexpected_keys", ()))]
    problems += [f"{k[0]}: shape {tuple(k[1])} vs {tuple(k[2])}" for k in sorted(info.get("mismatched_keys", ()))]
    return problems


@functools.cache
def build_classes(base_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) of the compressed form of the transformers model type `base_type`."""
    base_config = CONFIG_MAPPING[base_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]

    class Config(base_config):
        model_type = PREFIX + base_type

    class Model(base_model):
        config_class = Config

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            record = getattr(config, RECORD, None)
            if not isinstance(record, dict) or not isinstance(record.get("ranks"), dict):
                raise ValueError(f"the config has no '{RECORD}' record with a 'ranks' mapping: not an svdkit model")
            swap_in(self, record["ranks"], record.get("quantized"))

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            wanted = kwargs.pop("output_loading_info", False)
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
            problems = loading_problems(info)
            if problems:
                raise ValueError(f"the weights do not match the svdkit record in config.json: {summary(problems)}")
            return (model, info) if wanted else model

    Config.__name__ = Config.__qualname__ = f"Svdkit{base_config.__name__}"
    Model.__name__ = Model.__qualname__ = f"Svdkit{base_config.__name__.removesuffix('Config')}ForCausalLM"
    return Config, Model


def __getattr__(name: str) -> type:
    """``SvdkitLlamaConfig``, ``SvdkitLlamaForCausalLM``, ...: the classes an auto_map names, both named
    after the base config class, which identifies the base model type."""
    stem = name.removeprefix("Svdkit")
    config_name = stem if stem.endswith("Config") else stem.removesuffix("ForCausalLM") + "Config"
    for base_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if name.startswith("Svdkit") and CONFIG_MAPPING_NAMES.get(base_type) == config_name:
            return build_classes(base_type)[0 if stem == config_name else 1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
