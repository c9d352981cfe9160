"""Saving and loading low-rank models as Hugging Face folders.

A saved folder is an ordinary HF model folder (config.json, safetensors, tokenizer) whose config.json
carries ``quantization_config = {"quant_method": "svdkit", "method", "ratio", "ranks", "version", ...}``.
Importing svdkit registers that quant_method with transformers, so plain
``AutoModelForCausalLM.from_pretrained(folder)`` works: the model is built on the meta device, the
recorded projections are swapped for :class:`LowRankLinear` of the recorded ranks, then the weights
load straight into them (no dense copy is ever allocated).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import SvdkitError
from .lowrank import LowRankLinear, densify_

__all__ = ["SvdkitConfig", "save", "load", "densify", "read_svdkit_config", "prepare_output_dir"]


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


def prepare_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Check that `path` may be written: refuse an existing non-empty folder unless overwrite."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SvdkitError(f"output '{path}' exists and is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SvdkitError(f"output folder '{path}' exists and is not empty: choose another or pass --overwrite")
    return path


def _atomic_write(path: Path, overwrite: bool, write) -> Path:
    """Write a folder through `write(tmp)` in a temporary sibling, then rename it into place."""
    path = prepare_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary folder
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def save(model, tokenizer, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save a (compressed) model and its tokenizer as an HF folder; atomic (temp folder + rename)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _atomic_write(Path(path), overwrite, write)


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    kv_cache: str = "ordinary",
):
    """Load (model, tokenizer) saved by :func:`save` (or any model :func:`svdkit.load_model` takes).

    ``kv_cache="latent"`` makes generation cache the latents A x of the low-rank k_proj / v_proj
    instead of the keys and values (:mod:`svdkit.kvcache`).
    """
    from .kvcache import KV_MODES, enable_latent_kv_cache
    from .models import load_model, resolve_device

    if kv_cache not in KV_MODES:
        raise SvdkitError(f"kv_cache must be one of {', '.join(KV_MODES)}, got {kv_cache!r}")
    dev = resolve_device(device) if device is not None else None
    model, tokenizer = load_model(path, dtype=dtype)
    if kv_cache == "latent":
        enable_latent_kv_cache(model)
    if dev is not None:
        model.to(dev)
    return model, tokenizer


def densify(model, tokenizer, path: str | os.PathLike, overwrite: bool = False, inplace: bool = False) -> Path:
    """Write a plain dense model (W' = B A in nn.Linear) that any tool loads.

    `model` is left unchanged (a copy is densified) unless `inplace`, which saves the copy's memory.
    """
    import copy

    dense = model if inplace else copy.deepcopy(model)
    densify_(dense)
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    return save(dense, tokenizer, path, overwrite=overwrite)
