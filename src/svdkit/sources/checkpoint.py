"""A model folder read piece by piece: the model built on the meta device, each module's weights read from
the safetensors files when it is needed (memory-mapped, only the tensors asked for), and freed after.

This is how a model larger than memory is compressed (:mod:`svdkit.pipeline.streaming`): the skeleton
(:func:`open_checkpoint`) holds no weights; :func:`materialize` loads one module's (a decoder layer, the
embeddings) and :func:`release` returns it to the meta device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedConfig

from ..core.architecture import find_architecture
from ..core.device import available_memory, resolve_dtype
from ..errors import NotStreamable, SvdkitError
from ..saved.contents import dense_bytes, weight_files
from ..saved.format import read_svdkit_config, register_format
from ..saved.shards import SAFETENSORS_DTYPES
from .fingerprint import folder_fingerprint
from .models import require_causal_lm, require_sizes

__all__ = [
    "Checkpoint",
    "OpenCheckpoint",
    "check_fits_memory",
    "open_checkpoint",
    "materialize",
    "release",
]

_IGNORED = ("rotary_emb.inv_freq",)
"""tensors old checkpoints hold that transformers recomputes (it ignores them on loading too)"""


class Checkpoint:
    """The safetensors weights of a Hugging Face folder: which file holds each tensor, read on demand."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.files = weight_files(self.folder)
        if not self.files:
            raise NotStreamable(f"'{folder}' holds no safetensors weights (model.safetensors or an index)")
        self.where: dict[str, Path] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for f in self.files:
            try:
                with safe_open(f, "pt") as st:
                    for key in st.keys():
                        self.where[key] = f
                        self.dtypes[key] = SAFETENSORS_DTYPES.get(st.get_slice(key).get_dtype(), torch.float32)
            except (SafetensorError, OSError) as e:
                raise SvdkitError(f"'{f}' is not a readable safetensors file (truncated or corrupt?): {e}") from e

    def read(self, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors `keys` in `dtype` (floating tensors only are cast), each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self.where:
                raise SvdkitError(f"'{self.folder}' lacks the weight {key}: the checkpoint is incomplete")
            by_file.setdefault(self.where[key], []).append(key)
        out = {}
        for f, names in by_file.items():
            try:
                with safe_open(f, "pt") as st:
                    for key in names:
                        t = st.get_tensor(key)
                        out[key] = t.to(dtype) if t.is_floating_point() else t
            except (SafetensorError, OSError) as e:
                raise SvdkitError(f"cannot read {', '.join(names[:2])} from '{f}': {e}") from e
        return out

    def fingerprint(self) -> dict[str, str]:
        """File name -> digest of its content, for every file of the folder (:mod:`.fingerprint`)."""
        return folder_fingerprint(self.folder, self.files)

    def main_dtype(self) -> torch.dtype:
        """The dtype most floating-point elements are stored in."""
        kinds = [d for d in self.dtypes.values() if d.is_floating_point]
        return max(set(kinds), key=kinds.count) if kinds else torch.float32


@dataclass
class OpenCheckpoint:
    """What :func:`open_checkpoint` returns."""

    model: nn.Module
    """the model with every parameter on the meta device (buffers are real)"""
    tokenizer: Any
    checkpoint: Checkpoint
    dtype: torch.dtype
    tied: frozenset[str]
    """state-dict names of parameters that are another parameter (a tied output embedding): never stored"""

    def outside_keys(self) -> list[str]:
        """State-dict names outside the decoder layers, tied ones left out (saved once, under the first name)."""
        prefix = find_architecture(self.model).layers_path + "."
        return [k for k in self.model.state_dict() if not k.startswith(prefix) and k not in self.tied]


def _configured_dtype(config, checkpoint: Checkpoint) -> torch.dtype:
    declared = getattr(config, "dtype", None)
    if isinstance(declared, str) and declared in ("float32", "float16", "bfloat16"):
        return getattr(torch, declared)
    if isinstance(declared, torch.dtype) and declared.is_floating_point:
        return declared
    return checkpoint.main_dtype()


def open_checkpoint(folder: str | os.PathLike, dtype: str | torch.dtype = "auto") -> OpenCheckpoint:
    """The model of a local Hugging Face folder built on the meta device (no weight read), its tokenizer and
    its weight files; `dtype` "auto" keeps the checkpoint's own. Every name the model's parameters have
    must be in the checkpoint (or be tied), and nothing else but ignorable extras, or this refuses."""
    folder = Path(folder)
    register_format()
    if read_svdkit_config(folder) is not None:
        raise SvdkitError("this model is already compressed by svdkit: start from the dense model")
    checkpoint = Checkpoint(folder)
    try:
        declared = PreTrainedConfig.get_config_dict(folder)[0]
        require_causal_lm(declared, str(folder))
        require_sizes(declared, str(folder))
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        want = _configured_dtype(config, checkpoint) if resolve_dtype(dtype) == "auto" else resolve_dtype(dtype)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=want, trust_remote_code=False)
        model.tie_weights()  # as from_pretrained does (inside init_empty_weights a tied weight is made anew)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise SvdkitError(f"could not read a causal LM from '{folder}': {reason}") from e
    model.config.dtype = str(want).removeprefix("torch.")
    model.eval()
    tied = _tied(model)
    _check_names(model, checkpoint, tied)
    return OpenCheckpoint(model, tokenizer, checkpoint, want, tied)


def _tied(model: nn.Module) -> frozenset[str]:
    """Names of parameters that are the very parameter of an earlier name (tied embeddings)."""
    first: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            tied.add(name)
    return frozenset(tied)


def _check_names(model: nn.Module, checkpoint: Checkpoint, tied: frozenset[str]) -> None:
    """Every tensor the model needs is in the checkpoint and the checkpoint holds nothing unknown."""
    needed = set(model.state_dict())
    missing = sorted(k for k in needed - set(checkpoint.where) if k not in tied)
    extra = sorted(k for k in set(checkpoint.where) - needed if not k.endswith(_IGNORED))
    if missing or extra:
        example = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise NotStreamable(
            f"the tensor names in '{checkpoint.folder}' are not the model's ({example}; {len(missing)} missing, "
            f"{len(extra)} unexpected): a checkpoint that transformers converts while loading cannot be streamed"
        )


def materialize(
    module: nn.Module, prefix: str, checkpoint: Checkpoint, dtype: torch.dtype, names: list[str] | None = None
) -> None:
    """Load the parameters (and stored buffers) of `module` (all, or those in `names`), each named `prefix`
    + its state-dict name in the checkpoint, in `dtype`. A parameter tied to another is loaded once and
    stays tied."""
    names = [n for n in (module.state_dict() if names is None else names) if prefix + n in checkpoint.where]
    tensors = checkpoint.read([prefix + n for n in names], dtype)
    loaded: dict[int, nn.Parameter] = {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        value = tensors[prefix + name]
        if leaf in holder._parameters:
            loaded[id(holder._parameters[leaf])] = nn.Parameter(value, requires_grad=False)
        else:
            holder._buffers[leaf] = value
    _swap_parameters(module, lambda p: loaded.get(id(p)))


def release(module: nn.Module) -> None:
    """Free the weights of `module`: its parameters go back to the meta device (a tied one stays tied)."""
    moved: dict[int, nn.Parameter] = {}

    def to_meta(p: nn.Parameter) -> nn.Parameter | None:
        if p.is_meta:
            return None
        return moved.setdefault(id(p), nn.Parameter(p.detach().to("meta"), requires_grad=False))

    _swap_parameters(module, to_meta)


def _swap_parameters(module: nn.Module, new) -> None:
    """Replace every parameter p of `module` (under each name it has) by new(p), where that is not None."""
    for holder in module.modules():
        for leaf, p in list(holder._parameters.items()):
            if p is not None and (replacement := new(p)) is not None:
                holder._parameters[leaf] = replacement


def check_fits_memory(folder: str | os.PathLike, element_bytes: int, why: str, copies: float = 1.0) -> None:
    """Refuse, before loading, a model whose weights (`element_bytes` per element), times the `copies` of them
    the work holds, exceed the memory available now; `why` says why it must be loaded whole."""
    need, free = dense_bytes(folder, 0.0, element_bytes), available_memory()
    if need is not None and free is not None and need * copies > free:
        held = f"its weights need {need / 2**30:.1f} GiB"
        if copies > 1:
            held += f", {copies:.1f} times that with the healing's training state"
        raise SvdkitError(
            f"{why}, so the whole model must be loaded, but {held} and {free / 2**30:.1f} GiB of memory are "
            "available: use a method and allocation that stream layer by layer (e.g. svd-llm with the uniform "
            "allocation and --heal block), --dtype bfloat16, or a machine with more memory"
        )
