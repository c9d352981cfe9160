"""Calibration statistics kept on disk, one file per decoder layer, read back one layer at a time.

An allocation that fixes ranks from every matrix's statistics at once (ASVD's sensitivity search) and
gradient statistics need all statistics before the first matrix is factored (SVD-LLM V2's allocation
needs only each matrix's whitened spectrum: it keeps those and never spills). Held in RAM that is
one n x n float64 Gram matrix per distinct input of every layer; computed from the shapes (8 n^2 bytes
each), 0.8 GB for SmolLM2-135M, about 43 GB for Llama-2-7B and 650 GB for a 70B model.
:class:`StatisticsStore` writes each layer's statistics to a safetensors file as soon as the layer is
calibrated and reads one layer back at a time, so memory holds one layer's statistics; the disk holds
all of them (the figures above) until the store is closed. Small per-row statistics (FWSVD's Fisher
rows) stay in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.disk import check_free_space, check_writable, make_scratch_dir
from ..errors import SvdkitError
from .statistics import LinearStats

__all__ = ["StatisticsStore", "SPILL_PREFIX", "spill_bytes", "check_spill_space"]

SPILL_PREFIX = "svdkit-stats-"
"""the name of every statistics folder starts so; a later store sweeps those of dead processes"""


def spill_bytes(shapes: Mapping[str, tuple[int, int]], needs: Iterable[str]) -> int:
    """About the bytes a dense pass spills for targets of these shapes (full name -> (m, n)): per layer,
    8 n^2 for the Gram matrix and 8 n for the other input statistics of each distinct input.

    Which targets read one input shows only when the model runs; here targets under one parent module
    with one input width count once (q/k/v/o as one), so the figure is a lower bound."""
    needs = set(needs)
    per_input = (8 if "gram" in needs else 0, 8 * len(needs & {"mean_abs"}))
    inputs = {(name.rpartition(".")[0], n) for name, (_, n) in shapes.items()}
    return sum(per_input[0] * n * n + per_input[1] * n for _, n in inputs)


def check_spill_space(directory: str | os.PathLike | None, size: int) -> None:
    """Refuse, before calibration, a statistics folder that cannot be written or has less than `size`
    bytes free (`directory` None: the system's temporary folder)."""
    where = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    what = "the calibration statistics (--statistics-dir)"
    check_writable(where, what)
    check_free_space(where, size, what)


class StatisticsStore(Mapping[str, LinearStats]):
    """A read-only mapping full module name -> :class:`LinearStats` backed by a private folder.

    The folder is created inside `directory` (default: the system's temporary folder) and removed by
    :meth:`close` (or on leaving a ``with`` block); nothing else in `directory` is touched.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        if directory is not None:
            directory = Path(directory)
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SvdkitError(f"cannot create the statistics folder {directory}: {e}") from e
        try:
            self.path = make_scratch_dir(SPILL_PREFIX, directory)
        except OSError as e:
            raise SvdkitError(f"cannot write statistics to {directory or tempfile.gettempdir()}: {e}") from e
        self._where: dict[str, tuple[int, str]] = {}  # full name -> (layer file, owner key)
        self._tokens: dict[str, int] = {}
        self._extra: dict[str, dict[str, torch.Tensor]] = {}
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None
        self.bytes = 0

    def put_layer(self, index: int, stats: Mapping[str, LinearStats]) -> None:
        """Write one layer's statistics (full module name -> stats); shared values are written once."""
        owners: dict[int, str] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name, st in stats.items():
            key = owners.get(id(st.values))
            if key is None:  # q/k/v (and gate/up) share one values dict: write it once
                key = owners[id(st.values)] = str(len(owners))
                tensors.update({f"{key}/{s}": v.contiguous() for s, v in st.values.items()})
            self._where[name] = (index, key)
            self._tokens[name] = st.tokens
        path = self.path / f"layer-{index}.safetensors"
        try:
            save_file(tensors, str(path), metadata={"svdkit": json.dumps({"layer": index})})
        except (OSError, SafetensorError) as e:
            raise SvdkitError(
                f"cannot write calibration statistics to {path}: {e} (free space, or --statistics-dir)"
            ) from e
        self.bytes += path.stat().st_size
        self._cached = None

    def add(self, name: str, values: Mapping[str, torch.Tensor], tokens: int) -> None:
        """Attach small statistics (e.g. Fisher rows) to `name`, kept in memory."""
        self._extra.setdefault(name, {}).update(values)
        self._tokens.setdefault(name, tokens)

    def _layer(self, index: int) -> dict[str, torch.Tensor]:
        if self._cached is None or self._cached[0] != index:
            self._cached = (index, load_file(str(self.path / f"layer-{index}.safetensors")))
        return self._cached[1]

    def __getitem__(self, name: str) -> LinearStats:
        values: dict[str, torch.Tensor] = {}
        if name in self._where:
            index, key = self._where[name]
            values = {k.split("/", 1)[1]: v for k, v in self._layer(index).items() if k.startswith(key + "/")}
        elif name not in self._extra:
            raise KeyError(name)
        return LinearStats({**values, **self._extra.get(name, {})}, self._tokens[name], module=name)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._where, *self._extra]))

    def __len__(self) -> int:
        return len(set(self._where) | set(self._extra))

    def close(self) -> None:
        """Delete the folder and everything in it."""
        self._cached = None
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StatisticsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
