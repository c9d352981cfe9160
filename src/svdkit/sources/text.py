"""Text sources and token windows.

A source is a path to a text file or a name: ``wikitext2`` (WikiText-2 raw, test split), ``ptb``
(Penn Treebank, validation split), ``c4`` (one C4 validation shard) and ``demo`` (Python's own
documentation text from ``pydoc_data.topics``, always available). Named datasets are read from
``$SVDKIT_DATA`` when it holds them (``wikitext-2-raw/wiki.test.raw``, ``ptb/ptb.valid.txt``), else
through Hugging Face ``datasets`` when the network allows.

Calibration windows start at offsets drawn by ``torch.Generator().manual_seed(seed)`` uniformly from
[offset, len - seqlen); evaluation windows are consecutive and non-overlapping from ``offset``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..errors import SvdkitError, SvdkitWarning

__all__ = ["SOURCES", "load_text", "tokenize", "calibration_windows", "eval_windows", "source_tokens"]

SOURCES = ("wikitext2", "ptb", "c4", "demo")
_LOCAL = {"wikitext2": "wikitext-2-raw/wiki.test.raw", "ptb": "ptb/ptb.valid.txt"}


def _demo_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _from_datasets(name: str) -> str:
    try:
        import datasets
    except ImportError as e:
        raise SvdkitError(
            f"source '{name}' is not in $SVDKIT_DATA and the 'datasets' package is missing: "
            "pip install datasets (needs the network), or pass a path to a text file"
        ) from e
    try:
        if name == "wikitext2":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
            return "".join(rows)
        if name == "ptb":
            rows = datasets.load_dataset("ptb_text_only", "penn_treebank", split="validation")["sentence"]
            return "\n".join(rows)
        rows = datasets.load_dataset(
            "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
        )["text"][:3000]
        return "\n\n".join(rows)
    except Exception as e:  # network, hub and format errors all mean the same to the user
        raise SvdkitError(
            f"could not fetch '{name}' through Hugging Face datasets (offline?): {str(e).splitlines()[0]}; "
            "set SVDKIT_DATA to a folder holding it, or pass a path to a text file"
        ) from e


def load_text(source: str | os.PathLike) -> str:
    """The text of a source (a file path or a name in SOURCES), UTF-8 with LF line ends."""
    source = os.fspath(source)
    if source == "demo":
        return _demo_text()
    if source in _LOCAL:
        local = os.environ.get("SVDKIT_DATA")
        if local and (Path(local) / _LOCAL[source]).is_file():
            return load_text(Path(local) / _LOCAL[source])
        return _from_datasets(source)
    if source == "c4":
        return _from_datasets(source)
    path = Path(source)
    if not path.exists():
        raise SvdkitError(f"text source '{source}' is neither a file nor one of: {', '.join(SOURCES)}")
    if not path.is_file():
        raise SvdkitError(f"text source '{source}' is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SvdkitError(f"text source '{source}' is not UTF-8 text") from e
    return text.replace("\r\n", "\n")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize the whole text at once into a 1-D LongTensor."""
    ids = tokenizer(text, return_tensors="pt", return_attention_mask=False)["input_ids"][0]
    return ids.long()


def source_tokens(tokenizer, source: str | os.PathLike | torch.Tensor) -> torch.Tensor:
    """Token ids of a source; a tensor is taken as already tokenized."""
    if isinstance(source, torch.Tensor):
        return source.reshape(-1).long()
    if tokenizer is None:
        raise SvdkitError(f"text source '{source}' needs a tokenizer: pass one, or pass token ids")
    return tokenize(tokenizer, load_text(source))


def _check_length(ids: torch.Tensor, seqlen: int, offset: int, what: str) -> None:
    if seqlen < 2:
        raise SvdkitError(f"sequence length must be at least 2, got {seqlen}")
    if offset < 0:
        raise SvdkitError(f"offset must be >= 0, got {offset}")
    if ids.numel() - offset < seqlen:
        raise SvdkitError(
            f"the {what} text has {ids.numel()} tokens, {max(ids.numel() - offset, 0)} after offset {offset}: "
            f"too short for one window of {seqlen}; use a longer text, a smaller seqlen or a smaller offset"
        )


FEW_TOKENS = 8
"""calibration windows with fewer distinct tokens than this get a warning"""


def calibration_windows(ids: torch.Tensor, n: int, seqlen: int, offset: int = 0, seed: int = 0) -> torch.Tensor:
    """(n, seqlen) windows starting at seeded uniform offsets in [offset, len - seqlen)."""
    if n < 1:
        raise SvdkitError(f"the number of calibration samples must be at least 1, got {n}")
    _check_length(ids, seqlen, offset, "calibration")
    high = max(ids.numel() - seqlen, offset + 1)
    starts = torch.randint(offset, high, (n,), generator=torch.Generator().manual_seed(seed))
    windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    distinct = windows.unique().numel()
    if distinct < FEW_TOKENS and windows.numel() >= 4 * FEW_TOKENS:
        warnings.warn(
            f"the calibration windows hold only {distinct} distinct token(s) in {windows.numel():,} (a text of "
            "whitespace or one repeated word?): statistics from them describe little of the model's use; give "
            "a real text",
            category=SvdkitWarning,
            stacklevel=2,
        )
    return windows


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None, offset: int = 0) -> torch.Tensor:
    """Consecutive non-overlapping (w, seqlen) windows from `offset`; a short tail is left out."""
    _check_length(ids, seqlen, offset, "evaluation")
    count = (ids.numel() - offset) // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise SvdkitError(f"max windows must be at least 1, got {max_windows}")
        count = min(count, max_windows)
    return ids[offset : offset + count * seqlen].reshape(count, seqlen)
