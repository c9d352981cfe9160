"""Where a streamed compression keeps its finished work: a folder beside the output holding the settings, the
finished shards, each finished layer's record and the hidden states entering the next layer, locked while a
process works in it; renamed into the output's place once complete (:mod:`.streaming`)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..core import distributed
from ..core.atomic import install
from ..errors import SvdkitError

__all__ = ["PARTIAL", "Partial", "partial_path"]

PARTIAL = ".svdkit-partial"
"""suffix of the folder beside the output where a streamed run keeps its finished layers"""
SUMMARIES = "summaries.safetensors"
"""the allocator's summaries of every matrix, in the partial folder"""


def partial_path(output: Path) -> Path:
    """Where a streamed compression into `output` keeps its finished work: ``.NAME.svdkit-partial`` beside it."""
    return output.parent / f".{output.name}{PARTIAL}"


class Partial:
    """The folder beside the output where a streamed compression keeps its settings, finished shards and
    the hidden states entering the next layer; locked while a process works in it."""

    def __init__(self, output: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> None:
        self.output, self.path = output, partial_path(output)
        self.settings = json.loads(json.dumps(settings, default=str))
        self.resume, self.overwrite = resume, overwrite
        self.done = 0
        self.records: list[dict[str, Any]] = []
        """what the walk's work recorded about each finished layer"""
        self._lock = None

    def open(self) -> Partial:
        """Create the folder, or check and lock the one a killed run left (with resume)."""
        if self.path.is_dir() and not self.resume:
            if not self.overwrite:
                raise SvdkitError(
                    f"an unfinished compression into {self.output} is kept in {self.path}: add --resume to continue "
                    "it (same command), or --overwrite to start over"
                )
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / "lock", "a")  # noqa: SIM115 - held until close
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._lock.close()
            raise SvdkitError(f"another svdkit process is compressing into {self.path}: wait for it") from e
        try:
            self._check_settings()
        except BaseException:
            self.close()  # a refused resume holds nothing
            raise
        return self

    def read_state(self) -> Partial:
        """Read how many layers are finished and their records (every process, after :meth:`open` on rank 0)."""
        state = self.path / "state.json"
        kept = json.loads(state.read_text()) if state.is_file() else {}
        self.done, self.records = kept.get("layers_done", 0), kept.get("records", [])
        return self

    def _check_settings(self) -> None:
        path = self.path / "settings.json"
        if path.is_file():
            kept = json.loads(path.read_text())
            changed = _differences(kept, self.settings)
            if changed:
                raise SvdkitError(
                    f"--resume: the unfinished run in {self.path} was started with other settings "
                    f"({'; '.join(changed)}): run the same command as before, or pass --overwrite without --resume "
                    "to start over"
                )
            return
        for stale in self.path.iterdir():  # files of a run whose settings never got written
            if stale.name != "lock":
                stale.unlink()
        _write_atomic(path, json.dumps(self.settings, indent=2, sort_keys=True))

    def save_hidden(self, index: int, hidden: list[torch.Tensor], dense: list[torch.Tensor] | None) -> None:
        """Keep the hidden states entering layer `index` (and the dense ones)."""
        tensors = {f"hidden.{i}": h.contiguous() for i, h in enumerate(hidden)}
        tensors.update({f"dense.{i}": h.contiguous() for i, h in enumerate(dense or [])})
        path = self.path / f"hidden-{index}-{distributed.rank()}.safetensors"  # each process its own windows
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, str(partial))
        os.replace(partial, path)

    def load_hidden(self, keep_dense: bool) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The hidden states entering the first unfinished layer."""
        tensors = load_file(str(self.path / f"hidden-{self.done}-{distributed.rank()}.safetensors"))
        hidden = [tensors[f"hidden.{i}"] for i in range(sum(k.startswith("hidden.") for k in tensors))]
        dense = [tensors[f"dense.{i}"] for i in range(sum(k.startswith("dense.") for k in tensors))]
        return hidden, (dense if keep_dense else None)

    def save_summaries(self, summaries: dict[str, torch.Tensor]) -> None:
        """Keep the allocator's finished summaries (tensors by target name)."""
        path = self.path / SUMMARIES
        partial = path.with_name(path.name + ".partial")
        save_file({k: v.contiguous() for k, v in summaries.items()}, str(partial))
        os.replace(partial, path)

    def load_summaries(self) -> dict[str, torch.Tensor] | None:
        """The summaries a killed run finished, or None."""
        path = self.path / SUMMARIES
        return load_file(str(path)) if path.is_file() else None

    def mark_done(self, layers: int, records: list[dict[str, Any]]) -> None:
        """Record that the first `layers` layers are written (with their records); drop the hidden states no
        longer needed."""
        _write_atomic(self.path / "state.json", json.dumps({"layers_done": layers, "records": records}))
        self.done, self.records = layers, records
        for old in self.path.glob("hidden-*.safetensors"):
            if not old.name.startswith(f"hidden-{layers}-"):
                old.unlink()

    def finish(self) -> None:
        """Drop the resume files and rename the folder into the output's place."""
        for name in ("settings.json", "state.json", SUMMARIES, "lock"):
            (self.path / name).unlink(missing_ok=True)
        for old in [*self.path.glob("hidden-*"), *self.path.glob("*.partial")]:  # a killed write's leftovers
            old.unlink()
        self.close()
        install(self.path, self.output)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """'KEY: OLD -> NEW' for every setting that differs (nested keys dotted; a file's digest: 'changed')."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))]
    if old == new:
        return []
    if isinstance(old, str) and isinstance(new, str) and "sha256:" in old + new:
        return [f"{where}: its content changed"]
    return [f"{where}: {_shown(old)} -> {_shown(new)}"]


def _shown(value: Any) -> str:
    text = "absent" if value is None else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n")
    os.replace(partial, path)
