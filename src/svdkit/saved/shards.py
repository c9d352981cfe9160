"""Sharded safetensors written piece by piece: Hugging Face's layout (``model-0000i-of-0000n.safetensors``
plus ``model.safetensors.index.json``), one shard per decoder layer and one for everything outside them.

A streamed compression writes each decoder layer's shard as soon as the layer is final, so the model
never sits whole in memory. Each shard appears by an atomic rename, so a killed run leaves only complete
shards; the index is made last, from the shards' headers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.disk import make_ordinary

__all__ = ["INDEX", "SAFETENSORS_DTYPES", "shard_name", "write_shard", "write_index"]

INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors' dtype names (in a file's header) and the torch dtypes they stand for"""


def shard_name(index: int, count: int) -> str:
    """The file name of shard `index` (from 0) of `count`."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_shard(folder: Path, index: int, count: int, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one shard (contiguous copies of `tensors`, metadata as transformers writes it) atomically."""
    path = folder / shard_name(index, count)
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.detach().contiguous() for k, v in sorted(tensors.items())}, str(partial), metadata={"format": "pt"})
    make_ordinary(partial)  # the writer makes it private
    os.replace(partial, path)
    return path


def write_index(folder: Path, count: int) -> dict[str, str]:
    """Write the index of the `count` shards in `folder` from their headers; returns its weight map."""
    weight_map: dict[str, str] = {}
    total = 0
    for index in range(count):
        name = shard_name(index, count)
        with safe_open(folder / name, "pt") as st:
            for key in st.keys():
                weight_map[key] = name
                t = st.get_slice(key)
                shape, dtype = t.get_shape(), t.get_dtype()
                total += math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    body = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return weight_map
