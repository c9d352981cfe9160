"""The saved format: a Hugging Face folder whose config.json records how the model was compressed.

config.json carries ``quantization_config = {"quant_method": "svdkit", "method", "ratio", "ranks",
"version", ...}``. :func:`register_format` (run when svdkit is imported) registers that quant_method
with transformers, so plain ``AutoModelForCausalLM.from_pretrained(folder)`` works: the model is built
on the meta device, the recorded projections are swapped for :class:`LowRankLinear` of the recorded
ranks, then the weights load straight into them (no dense copy is ever allocated).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.lowrank import LowRankLinear
from ..errors import SvdkitError

__all__ = ["SvdkitConfig", "SvdkitQuantizer", "register_format", "swap_to_low_rank", "read_svdkit_config"]


class SvdkitConfig(QuantizationConfigMixin):
    """The svdkit record stored as a model's quantization_config."""

    def __init__(
        self,
        method: str = "",
        ratio: float | None = None,
        ranks: dict[str, int] | None = None,
        version: str = "",
        method_config: dict[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        self.quant_method = "svdkit"
        self.method = method
        self.ratio = ratio
        self.ranks = dict(ranks or {})
        self.version = version
        self.method_config = dict(method_config or {})
        for k, v in extra.items():
            if k != "quant_method":
                setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class SvdkitQuantizer(HfQuantizer):
    """Swaps the recorded linear layers for LowRankLinear before the weights load."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        swap_to_low_rank(model, self.quantization_config.ranks)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # The result is an ordinary float model: let .to(), .float(), .half() and training work.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model, "quantization_method"):
            del model.quantization_method
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register_format() -> None:
    """Teach transformers the "svdkit" quant_method, so from_pretrained builds the low-rank model (idempotent)."""
    if "svdkit" not in AUTO_QUANTIZER_MAPPING:  # transformers' public hooks refuse a second registration
        register_quantization_config("svdkit")(SvdkitConfig)
        register_quantizer("svdkit")(SvdkitQuantizer)


def swap_to_low_rank(model: torch.nn.Module, ranks: dict[str, int]) -> None:
    """Replace each named nn.Linear by an (uninitialised) LowRankLinear of the given rank, in place."""
    for name, rank in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise SvdkitError(f"the saved ranks name module '{name}', which this model does not have") from e
        if isinstance(old, LowRankLinear):
            continue
        new = LowRankLinear(
            old.in_features,
            old.out_features,
            int(rank),
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        model.set_submodule(name, new)


def read_svdkit_config(folder: str | os.PathLike) -> dict | None:
    """The svdkit record in a saved folder's config.json, or None for an ordinary model."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        q = json.loads(path.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise SvdkitError(f"'{path}' is not a valid config.json: {e}") from e
    return q if isinstance(q, dict) and q.get("quant_method") == "svdkit" else None
