"""What a resumed compression checks its source by: the content of every file of the model folder.

A file's name, size and modification time are not enough (``cp -p`` and ``rsync -a`` restore the time of a
changed file). Every file but the weights (config.json, generation and tokenizer files: they shape the
computation) is hashed whole; so are the weights while the folder's weights total at most
:data:`FULL_HASH_BYTES` (its time: docs/faults.md). Larger weights are
hashed by their safetensors header (every tensor's name, dtype, shape and offsets) and :data:`SAMPLES` blocks
spread over the file, which any replaced or re-quantized shard changes; a few changed values inside a shard
larger than that can pass unnoticed (docs/faults.md).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

__all__ = ["FULL_HASH_BYTES", "SAMPLES", "folder_fingerprint"]

FULL_HASH_BYTES = 4 * 2**30
"""weights up to this many bytes in all are hashed whole"""
SAMPLES = 256
"""blocks of :data:`_BLOCK` bytes hashed per weight file above that"""
_BLOCK = 64 * 2**10
_CHUNK = 8 * 2**20


def folder_fingerprint(folder: Path, weights: list[Path]) -> dict[str, str]:
    """File name -> digest of its content, for the `weights` and every other file directly in `folder` (but
    hidden ones: an output's lock file may sit there)."""
    whole = sum(f.stat().st_size for f in weights) <= FULL_HASH_BYTES
    others = sorted(f for f in folder.iterdir() if f.is_file() and f not in weights and not f.name.startswith("."))
    out = {f.name: _whole(f) for f in others}
    out.update({f.name: _whole(f) if whole else _sampled(f) for f in weights})
    return out


def _whole(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _sampled(path: Path) -> str:
    """The safetensors header (its 8-byte length, then the JSON) and SAMPLES blocks spread evenly."""
    h, size = hashlib.sha256(), path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        h.update(head)
        if len(head) == 8:
            h.update(f.read(struct.unpack("<Q", head)[0]))
        for i in range(SAMPLES):
            f.seek(size * i // SAMPLES)
            h.update(f.read(_BLOCK))
    return f"sampled-sha256:{size}:" + h.hexdigest()
