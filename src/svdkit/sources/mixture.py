"""Calibration text mixtures: the ``--calib`` grammar and the windows it names.

A spec is ``PART[,PART...]``; a part is ``SOURCE[[START:END]][:N]``:

- SOURCE: a name in :data:`~svdkit.sources.text.SOURCES` (wikitext2, ptb, c4, demo), ``self`` (text the
  model writes itself, :mod:`svdkit.sources.selftext`) or a text file;
- ``[START:END]``: a token slice of the source (Python's slice rules: negative counts from the end, either
  side may be empty) that the part's windows are drawn from; without it the windows start at the global
  offset (``--calib-offset``) as before. ``self`` takes no slice;
- N: the part's window count. A single part without N takes the sample count (``--calib-samples``); in a
  mixture of two or more parts every part gives N, and the sample count is their sum.

Each part's windows are drawn from its own token stream with the global seed, exactly as a lone source is
(:func:`~svdkit.sources.text.calibration_windows` on the stream cut at END, from START), and the mixture's
windows are the parts' windows in spec order. A single source gives the very windows it gave before
mixtures existed. A whole spec that names an existing file is that file, whatever characters its path holds.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SvdkitError
from .selftext import SELF_TEXT_VERSION, self_windows
from .text import SOURCES, calibration_windows, source_tokens

__all__ = ["SELF", "Part", "parse_calib", "spec_counts", "mixture_windows", "parts_record"]

SELF = "self"
"""the source name of text the model writes itself"""

_PART = re.compile(r"(?P<source>.*?)(?:\[(?P<start>[^\[\]:]*):(?P<end>[^\[\]:]*)\])?(?::(?P<n>[^:\[\]]*))?")


@dataclass(frozen=True)
class Part:
    """One part of a calibration spec."""

    source: str
    windows: int | None = None
    """its window count; None: the sample count (a single part only)"""
    start: int | None = None
    end: int | None = None
    sliced: bool = False
    """whether the part gives a slice (else its windows start at the global offset)"""

    def __str__(self) -> str:
        cut = f"[{'' if self.start is None else self.start}:{'' if self.end is None else self.end}]"
        return self.source + (cut if self.sliced else "") + ("" if self.windows is None else f":{self.windows}")

    def bounds(self, length: int, offset: int) -> tuple[int, int]:
        """[start, end) of a stream of `length` tokens its windows lie in (no slice: from `offset` to the end)."""
        if not self.sliced:
            return offset, length
        start, end, _ = slice(self.start, self.end).indices(length)
        return start, end


def _known(source: str) -> bool:
    return source in SOURCES or source == SELF or Path(source).is_file()


def _int(text: str, what: str, part: str) -> int | None:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"calibration part '{part}': {what} must be an integer, got {text!r}") from None


def _count(text: str, part: str) -> int:
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise ValueError(f"calibration part '{part}': N (its window count) must be a positive integer, got {text!r}")
    return int(text)


def _part(text: str) -> Part:
    """One part (checked: a known source or an existing file, a well-formed slice and count)."""
    if _known(text):
        return Part(text)
    m = _PART.fullmatch(text)
    source = m.group("source") if m else text
    if not source:
        raise ValueError(f"calibration part '{text}' names no source")
    if not _known(source):
        what = "is not a file" if Path(source).exists() else f"is neither a file nor one of: {', '.join(SOURCES)}, self"
        raise ValueError(f"text source '{source}' {what}")
    sliced = m.group("start") is not None
    if sliced and source == SELF:
        raise ValueError(f"calibration part '{text}': 'self' is written by the model and takes no [START:END] slice")
    start = _int(m.group("start") or "", "START", text)
    end = _int(m.group("end") or "", "END", text)
    windows = None if m.group("n") is None else _count(m.group("n"), text)
    return Part(source, windows, start, end, sliced)


def parse_calib(spec: str | os.PathLike) -> tuple[Part, ...]:
    """The parts of a calibration spec; ValueError (one line) for a bad one: an empty part, an unknown
    source or a missing file, a bad slice or N, a slice on ``self``, a mixture part without N."""
    spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a calibration spec must be a non-empty string, got {spec!r}")
    if _known(spec):  # a file whose path holds ',', ':' or '[' is still one file
        return (Part(spec),)
    texts = spec.split(",")
    if any(not t.strip() for t in texts):
        raise ValueError(
            f"calibration spec '{spec}' has an empty part: parts are SOURCE[[START:END]][:N], comma-separated"
        )
    parts = tuple(_part(t.strip()) for t in texts)
    lacking = [str(p) for p in parts if p.windows is None]
    if len(parts) > 1 and lacking:
        raise ValueError(
            f"calibration spec '{spec}' mixes {len(parts)} parts, so each gives its window count as SOURCE:N; "
            f"{', '.join(repr(t) for t in lacking)} lack(s) one"
        )
    return parts


def spec_counts(parts: tuple[Part, ...], samples: int | None) -> tuple[int, ...]:
    """Each part's window count: its N, or `samples` for a single part without one."""
    return tuple(samples if p.windows is None else p.windows for p in parts)


def _stream_windows(part: Part, ids: torch.Tensor, n: int, seqlen: int, offset: int, seed: int) -> torch.Tensor:
    """`n` windows of a named or file part, drawn from [start, end) of its token stream `ids`."""
    if not part.sliced:
        return calibration_windows(ids, n, seqlen, offset, seed)  # exactly as a lone source always was
    start, end = part.bounds(ids.numel(), offset)
    if end - start < seqlen:
        raise SvdkitError(
            f"calibration part '{part}' spans tokens [{start}, {end}) of the {ids.numel()} of '{part.source}': "
            f"fewer than one window of {seqlen}; widen the slice or use a smaller --calib-seqlen"
        )
    return calibration_windows(ids[:end], n, seqlen, start, seed)


def mixture_windows(
    source: str | os.PathLike | torch.Tensor,
    samples: int,
    seqlen: int,
    offset: int = 0,
    seed: int = 0,
    tokenizer: Any = None,
    model: torch.nn.Module | None = None,
    texts: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The (samples x seqlen) calibration windows of a spec (or of token ids, a tensor): each part's windows
    in spec order. `texts` gives the token streams of named sources (instead of reading them); ``self``
    needs the dense `model` and the `tokenizer`."""
    if isinstance(source, torch.Tensor):
        return calibration_windows(source_tokens(tokenizer, source), samples, seqlen, offset, seed)
    parts = parse_calib(source)
    streams: dict[str, torch.Tensor] = dict(texts or {})
    out = []
    for part, n in zip(parts, spec_counts(parts, samples), strict=True):
        if part.source == SELF:
            out.append(_self(model, tokenizer, n, seqlen, seed, progress))
            continue
        if part.source not in streams:
            streams[part.source] = source_tokens(tokenizer, part.source)
        out.append(_stream_windows(part, streams[part.source], n, seqlen, offset, seed))
    return torch.cat(out)


def _self(model, tokenizer, n: int, seqlen: int, seed: int, progress: bool) -> torch.Tensor:
    if model is None or tokenizer is None:
        raise SvdkitError("calibration text 'self' is written by the dense model: it needs the model and its tokenizer")
    return self_windows(model, tokenizer, n, seqlen, seed, progress)


def parts_record(spec: str | os.PathLike, samples: int, offset: int) -> list[dict[str, Any]]:
    """What the saved record keeps of each part: its source, window count and token range (start, end:
    None is the end of its text; ``self`` has none, and the version of its generation settings)."""
    parts = parse_calib(spec)
    rows = []
    for part, n in zip(parts, spec_counts(parts, samples), strict=True):
        row: dict[str, Any] = {"source": part.source, "windows": n, "start": None, "end": None}
        if part.source == SELF:
            row["generation"] = SELF_TEXT_VERSION
        else:
            row.update(start=(part.start or 0) if part.sliced else offset, end=part.end)
        rows.append(row)
    return rows
