"""Saved folders: write one atomically, load one back (optionally with the latent KV cache), export a
dense copy."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers.dynamic_module_utils import custom_object_save

from ..core.device import resolve_device
from ..core.disk import (
    check_free_space,
    check_writable,
    io_reason,
    is_stale,
    make_scratch_dir,
    remove_scratch,
    scratch_dir,
    sweep_stale,
)
from ..core.lowrank import count_parameters, densify_
from ..core.signals import signals_held
from ..deploy.card import model_card
from ..deploy.runtime import OnnxCausalLM, place
from ..errors import SvdkitError
from ..sources.models import load_model
from ..version import __version__
from .format import make_plain
from .kvcache import KV_MODES, enable_latent_kv_cache

__all__ = [
    "atomic_write",
    "save",
    "load",
    "densify",
    "prepare_output_dir",
    "install",
    "is_io_error",
    "write_card",
    "write_metadata",
]


def prepare_output_dir(path: str | os.PathLike, overwrite: bool, size: int = 0) -> Path:
    """Check that `path` may be written, before any work: refuse a file, an existing non-empty folder
    unless overwrite, and a location where no file can be created; with `size` (bytes), a file system
    with less room than that."""
    path = Path(path)
    if path.parent.is_dir():
        _recover(path)
    if path.exists() and not path.is_dir():
        raise SvdkitError(f"output '{path}' exists and is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SvdkitError(f"output folder '{path}' exists and is not empty: choose another or pass --overwrite")
    check_writable(path.parent)  # the temporary sibling and the rename happen there
    check_free_space(path.parent, size)
    return path


def atomic_write(path: Path, overwrite: bool, write) -> Path:
    """Write a folder through `write(folder)` inside a temporary sibling (marked as this process's, see
    :func:`~svdkit.core.disk.make_scratch_dir`), then rename it into place. An I/O error (a full disk) is
    an :class:`SvdkitError` naming the file and the reason; the temporary folder is removed whatever
    happens, and an existing folder is replaced only by a complete one."""
    path = prepare_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent, ".*.tmp-*")  # any killed save's, whatever folder it was writing
    try:
        with scratch_dir(f".{path.name}.tmp-", path.parent) as tmp:
            staged = tmp / path.name  # made by mkdir: an ordinary folder (umask), without the owner file
            staged.mkdir()
            write(staged)
            install(staged, path)
    except Exception as e:  # noqa: BLE001 - I/O errors only, re-raised otherwise
        if not is_io_error(e):
            raise
        raise SvdkitError(f"could not write {path} ({io_reason(e)}); nothing was written") from e
    return path


def install(staged: Path, path: Path) -> None:
    """Put the complete folder `staged` at `path` (on the same file system) by a rename; an existing folder
    is replaced atomically (:func:`_swap`)."""
    if not path.exists():
        os.replace(staged, path)
        return
    _swap(path, staged, make_scratch_dir(f".{path.name}.old-", path.parent))


def write_metadata(model, tokenizer, folder: Path) -> None:
    """Everything ``save_pretrained`` writes but the weights: config.json (with the svdkit record), the
    modeling file and auto_map of an svdkit model, generation_config.json, and the tokenizer's files."""
    model.config.architectures = [type(model).__name__]
    if getattr(type(model), "_auto_class", None) is not None:  # svdkit's classes: copy their file
        custom_object_save(model, folder, config=model.config)
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_card(model, folder: Path, parameters: int | None = None) -> None:
    """README.md: the model card (:func:`svdkit.deploy.card.model_card`) of a model written to `folder`."""
    facts = {
        "compression": getattr(model.config, "svdkit", None),
        "source": getattr(model, "name_or_path", ""),
        "svdkit": __version__,
        "parameters": parameters or count_parameters(model),
    }
    (folder / "README.md").write_text(model_card(facts))


def is_io_error(e: Exception) -> bool:
    """An OSError, safetensors' error, or the bare Exception the tokenizers library raises for an I/O
    error of Rust's ("No space left on device (os error 28)")."""
    return isinstance(e, OSError | SafetensorError) or (type(e) is Exception and "(os error " in str(e))


def _swap(path: Path, new: Path, old: Path) -> None:
    """Replace the folder `path` by `new`, through the scratch folder `old` (removed at the end), with
    SIGINT, SIGTERM and SIGHUP held back meanwhile (they arrive once it is done): an interruption never
    leaves `path` missing or a folder behind. A kill -9 between the two renames leaves the old folder in
    `old`, which the next save to `path` puts back (:func:`_recover`)."""
    with signals_held():
        os.replace(path, old / path.name)
        try:
            os.replace(new, path)
        except OSError:
            os.replace(old / path.name, path)
            raise
        finally:
            remove_scratch(old)


def _recover(path: Path) -> None:
    """Put back a folder that a killed save left in a stale ``.NAME.old-*`` while `path` is missing; then
    remove the stale ones."""
    for old in sorted(path.parent.glob(f".{path.name}.old-*")):
        if not path.exists() and (old / path.name).is_dir() and is_stale(old):
            os.replace(old / path.name, path)
    sweep_stale(path.parent, f".{path.name}.old-*")


def save(model, tokenizer, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save a (compressed) model and its tokenizer as an HF folder; atomic (temp folder + rename).

    A compressed model is written in svdkit's format (:mod:`svdkit.saved.format`), which loads with or
    without svdkit.
    """

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_card(model, tmp)

    return atomic_write(Path(path), overwrite, write)


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    kv_cache: str = "ordinary",
):
    """Load (model, tokenizer) saved by :func:`save` (or any model :func:`svdkit.load_model` takes).

    ``kv_cache="latent"`` makes generation cache the latents A x of the low-rank k_proj / v_proj
    instead of the keys and values (:mod:`svdkit.saved.kvcache`). `dtype`: a torch dtype or a name in
    :data:`~svdkit.core.device.DTYPES` (``"auto"``: the folder's own).
    """
    if kv_cache not in KV_MODES:
        raise SvdkitError(f"kv_cache must be one of {', '.join(KV_MODES)}, got {kv_cache!r}")
    dev = resolve_device(device) if device is not None else None  # a bad device fails before any loading
    model, tokenizer = load_model(path, dtype=dtype)
    if isinstance(model, OnnxCausalLM):
        if kv_cache != "ordinary":
            raise SvdkitError("the latent KV cache is for torch models: an ONNX export keeps its cache in the graph")
        place(model, device)
        return model, tokenizer
    if kv_cache == "latent":
        enable_latent_kv_cache(model)
    if dev is not None:
        model.to(dev)
    return model, tokenizer


def densify(model, tokenizer, path: str | os.PathLike, overwrite: bool = False, inplace: bool = False) -> Path:
    """Write a plain dense model (W' = B A in nn.Linear) that any tool loads.

    `model` is left unchanged (a copy is densified) unless `inplace`, which saves the copy's memory.
    """
    dense = model if inplace else copy.deepcopy(model)
    densify_(dense)
    make_plain(dense)
    return save(dense, tokenizer, path, overwrite=overwrite)
