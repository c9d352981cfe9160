"""The saved format: a Hugging Face folder that loads as the compressed model, or refuses, anywhere.

A compressed model gets svdkit's classes (:func:`make_portable`): its base model's classes with
model type ``svdkit_<base>``, the record under ``config.svdkit`` (method, ratio, ranks, version, ...),
defined in :mod:`svdkit.core.modeling_svdkit`, a file that needs only torch and transformers. So
``save_pretrained`` (and ``push_to_hub``) writes config.json with that model type, the record and an
``auto_map``, and copies ``modeling_svdkit.py`` beside it (transformers' convention for custom code):

- with svdkit imported, ``AutoModelForCausalLM.from_pretrained(folder)`` builds the low-rank model:
  :func:`register_format` maps every ``svdkit_<base>`` model type to the classes of
  :func:`portable_classes`, which build the base model on the meta device with the recorded
  projections swapped for :class:`LowRankLinear`, then load the weights into them;
- without svdkit, ``from_pretrained(folder, trust_remote_code=True)`` does the same through the
  folder's own modeling file, and without ``trust_remote_code`` transformers refuses the folder
  (the model type is unknown to it), rather than loading a dense model with random projections.

Folders written before this format kept the record as ``quantization_config`` (quant_method
"svdkit"); :class:`SvdkitQuantizer` still loads them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.modeling_svdkit import PREFIX, RECORD, build_classes, swap_in
from ..errors import SvdkitError

__all__ = [
    "PREFIX",
    "RECORD",
    "SvdkitConfig",
    "SvdkitQuantizer",
    "register_format",
    "portable_classes",
    "base_classes",
    "make_portable",
    "make_plain",
    "read_svdkit_config",
    "check_record",
]


def portable_classes(base_type: str) -> tuple[type, type]:
    """svdkit's (config, causal-LM) classes for the model type ``svdkit_<base_type>``, registered with the
    Auto classes and for saving: ``save_pretrained`` writes their auto_map and copies their file."""
    config_cls, model_cls = build_classes(base_type)
    if getattr(model_cls, "_auto_class", None) is None:
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        config_cls.register_for_auto_class()
        model_cls.register_for_auto_class("AutoModelForCausalLM")
    return config_cls, model_cls


def _lazy_config(base_type: str) -> type:
    """What AutoConfig finds for ``svdkit_<base_type>``: builds the real classes when a folder is read."""

    def from_dict(cls, config_dict: dict, **kwargs):
        return portable_classes(base_type)[0].from_dict(config_dict, **kwargs)

    attrs = {"model_type": PREFIX + base_type, "from_dict": classmethod(from_dict)}
    return type(f"SvdkitLazyConfig_{base_type}", (), attrs)


def register_format() -> None:
    """Teach transformers svdkit's model types and the legacy "svdkit" quant_method (idempotent)."""
    if "svdkit" in AUTO_QUANTIZER_MAPPING:  # transformers' public hooks refuse a second registration
        return
    register_quantization_config("svdkit")(SvdkitConfig)
    register_quantizer("svdkit")(SvdkitQuantizer)
    for base_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        AutoConfig.register(PREFIX + base_type, _lazy_config(base_type), exist_ok=True)


def base_classes(model: nn.Module) -> tuple[str, type, type]:
    """(model type, config class, model class) of the dense model that `model` is or was compressed from;
    an error for a model svdkit's format cannot describe (checked before compressing)."""
    base_type = model.config.model_type.removeprefix(PREFIX)
    try:
        base_config = CONFIG_MAPPING[base_type]
        base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    except KeyError as e:
        raise SvdkitError(f"transformers has no causal LM for the model type '{base_type}'") from e
    config_cls, model_cls = build_classes(base_type)
    if type(model) not in (base_model, model_cls) or type(model.config) not in (base_config, config_cls):
        raise SvdkitError(
            f"a {type(model).__name__} with a {type(model.config).__name__} cannot be saved in svdkit's format: it "
            f"saves the classes transformers' AutoModelForCausalLM builds for '{base_type}' ({base_model.__name__})"
        )
    return base_type, base_config, base_model


def make_portable(model: nn.Module, record: dict) -> None:
    """Give a compressed model its `record` and svdkit's classes (a subclass of its own with the same
    state), so that ``save_pretrained`` writes a folder that loads as this model anywhere."""
    config_cls, model_cls = portable_classes(base_classes(model)[0])
    model.config.__class__ = config_cls
    model.__class__ = model_cls
    setattr(model.config, RECORD, record)


def make_plain(model: nn.Module) -> None:
    """Undo :func:`make_portable` on a model whose layers are dense again: its base classes, no record."""
    _, base_config, base_model = base_classes(model)
    model.config.__class__ = base_config
    model.__class__ = base_model
    for key in ("quantization_config", RECORD, "auto_map"):
        if key in model.config.__dict__:
            delattr(model.config, key)


class SvdkitConfig(QuantizationConfigMixin):
    """The record of a legacy folder, stored as its quantization_config."""

    def __init__(self, ranks: dict[str, int] | None = None, **extra: Any) -> None:
        self.quant_method = "svdkit"
        self.ranks = dict(ranks or {})
        for k, v in extra.items():
            if k != "quant_method":
                setattr(self, k, v)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class SvdkitQuantizer(HfQuantizer):
    """Loads a legacy folder: swaps the recorded linear layers for LowRankLinear before the weights load."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model, **kwargs):
        swap_in(model, self.quantization_config.ranks)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # The result is an ordinary float model: let .to(), .float(), .half() and training work, and
        # save_pretrained write the current format.
        record = {k: v for k, v in self.quantization_config.to_dict().items() if k != "quant_method"}
        del model.config.quantization_config
        make_portable(model, record)
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


def read_svdkit_config(folder: str | os.PathLike) -> dict | None:
    """The checked svdkit record in a saved folder's config.json, or None for an ordinary model."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SvdkitError(f"cannot read '{path}': {e}") from e
    if not isinstance(config, dict):
        raise SvdkitError(f"'{path}' is not a valid config.json: it holds no JSON object")
    record = config.get(RECORD)
    if record is None:
        legacy = config.get("quantization_config")
        if not (isinstance(legacy, dict) and legacy.get("quant_method") == "svdkit"):
            return None
        record = legacy
    check_record(record, path)
    return record


def check_record(record: Any, where: str | os.PathLike) -> None:
    """Refuse a record that is not {"ranks": {module name: positive integer}, ...}."""
    if not isinstance(record, dict):
        raise SvdkitError(f"'{where}': the svdkit record is not a JSON object: the folder is damaged")
    ranks = record.get("ranks")
    if not isinstance(ranks, dict):
        raise SvdkitError(
            f"'{where}': the svdkit record's 'ranks' must map module names to ranks, got {type(ranks).__name__}: "
            "the folder is damaged; compress the model again"
        )
    for name, rank in ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise SvdkitError(
                f"'{where}': the svdkit record gives module '{name}' the rank {rank!r}, not a positive integer: "
                "the folder is damaged; compress the model again"
            )
