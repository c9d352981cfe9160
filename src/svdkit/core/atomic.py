"""Folders written whole or not at all: an output checked before any work, written in a temporary sibling and
renamed into place, an existing folder replaced atomically (signals held back meanwhile), and the leftovers
of a killed write put back or swept by the next one."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError

from ..errors import SvdkitError
from .disk import (
    check_free_space,
    check_writable,
    io_reason,
    is_stale,
    make_scratch_dir,
    remove_scratch,
    scratch_dir,
    sweep_stale,
)
from .owner import own_output
from .signals import signals_held

__all__ = ["atomic_write", "check_not_source", "install", "is_io_error", "prepare_output_dir"]


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


def check_not_source(source: str | os.PathLike, output: str | os.PathLike) -> None:
    """Refuse an output that is the model being read (`source`, where it is a local path) or a folder holding
    it: writing there would replace the only copy of the source."""
    if not Path(source).exists():
        return  # a hub id or an alias: nothing local to replace
    src, out = Path(os.path.realpath(source)), Path(os.path.realpath(output))
    if out == src or out in src.parents:
        what = "the model being read" if out == src else f"a folder holding the model being read ({source})"
        raise SvdkitError(f"the output {output} is {what}: writing there would replace it; choose another output")


def atomic_write(path: Path, overwrite: bool, write) -> Path:
    """Write a folder through `write(folder)` inside a temporary sibling (marked as this process's, see
    :func:`~svdkit.core.disk.make_scratch_dir`), then rename it into place. An I/O error (a full disk) is
    an :class:`SvdkitError` naming the file and the reason; the temporary folder is removed whatever
    happens, and an existing folder is replaced only by a complete one; `path`'s lock is held throughout
    (:func:`~svdkit.core.owner.own_output`)."""
    with own_output(path):
        return _atomic_write(path, overwrite, write)


def _atomic_write(path: Path, overwrite: bool, write) -> Path:
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
