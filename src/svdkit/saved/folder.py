"""Saved folders: write one atomically, load one back (optionally with the latent KV cache), export a
dense copy, and read what a folder holds without loading the model."""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.device import resolve_device
from ..core.lowrank import densify_
from ..errors import SvdkitError
from ..sources.models import load_model
from .format import read_svdkit_config
from .kvcache import KV_MODES, enable_latent_kv_cache

__all__ = ["save", "load", "densify", "prepare_output_dir", "folder_info", "natural_key"]


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
    instead of the keys and values (:mod:`svdkit.saved.kvcache`).
    """
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
    dense = model if inplace else copy.deepcopy(model)
    densify_(dense)
    if hasattr(dense.config, "quantization_config"):
        del dense.config.quantization_config
    return save(dense, tokenizer, path, overwrite=overwrite)


def folder_info(folder: str | Path) -> dict:
    """Method, ratio, ranks and parameter counts of a saved folder, read without loading the model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SvdkitError(f"'{folder}' is not a folder")
    record = read_svdkit_config(folder)
    if record is None:
        raise SvdkitError(f"'{folder}' is not an svdkit-compressed model folder (no svdkit record in config.json)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SvdkitError(f"'{folder}' has no .safetensors weights")
    params = 0
    tensor_shapes: dict[str, list[int]] = {}
    for f in files:
        with safe_open(f, "pt") as st:
            for key in st.keys():
                tensor_shapes[key] = list(st.get_slice(key).get_shape())
                params += math.prod(tensor_shapes[key])
    ranks = record.get("ranks", {})
    shapes, dense_kept = {}, []
    kinds = {re.sub(r"^.*\.\d+\.", "", name) for name in ranks}
    for key, shape in tensor_shapes.items():
        module, _, leaf = key.rpartition(".")
        if module in ranks and leaf == "B":
            shapes[module] = [shape[0], tensor_shapes[f"{module}.A"][1]]
        elif leaf == "weight" and len(shape) == 2 and re.sub(r"^.*\.\d+\.", "", module) in kinds:
            if re.search(r"\.\d+\.", module):  # a target type inside a decoder layer, kept dense
                shapes[module] = shape
                dense_kept.append(module)
    return {
        "method": record.get("method"),
        "ratio": record.get("ratio"),
        "params": params,
        "params_dense": record.get("params_dense"),
        "ranks": ranks,
        "version": record.get("version"),
        "allocation": record.get("allocation"),
        "update": record.get("update", "none"),
        "kv_ratio": record.get("kv_ratio"),
        "training": record.get("training"),
        "shapes": dict(sorted(shapes.items(), key=lambda kv: natural_key(kv[0]))),
        "dense_kept": sorted(dense_kept, key=natural_key),
    }


def natural_key(name: str) -> tuple:
    """Sort key that puts layer 2 before layer 10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))
