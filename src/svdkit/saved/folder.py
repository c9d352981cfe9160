"""Saved folders: write one atomically, load one back (optionally with the latent KV cache), export a
dense copy."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from transformers.dynamic_module_utils import custom_object_save

from ..core.atomic import atomic_write
from ..core.lowrank import count_parameters, densify_
from ..version import __version__
from .card import model_card
from .format import make_plain

__all__ = [
    "save",
    "densify",
    "write_card",
    "write_metadata",
]


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
    """README.md: the model card (:func:`svdkit.saved.card.model_card`) of a model written to `folder`."""
    facts = {
        "compression": getattr(model.config, "svdkit", None),
        "source": getattr(model, "name_or_path", ""),
        "svdkit": __version__,
        "parameters": parameters or count_parameters(model),
    }
    (folder / "README.md").write_text(model_card(facts))


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


def densify(model, tokenizer, path: str | os.PathLike, overwrite: bool = False, inplace: bool = False) -> Path:
    """Write a plain dense model (W' = B A in nn.Linear) that any tool loads.

    `model` is left unchanged (a copy is densified) unless `inplace`, which saves the copy's memory.
    """
    dense = model if inplace else copy.deepcopy(model)
    densify_(dense)
    make_plain(dense)
    return save(dense, tokenizer, path, overwrite=overwrite)
