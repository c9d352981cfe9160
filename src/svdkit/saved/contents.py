"""What a saved folder holds, read from config.json and the safetensors headers without loading the
model: its record, its tensors' shapes, whether the two agree (:func:`check_folder`), and the summary
``svdkit info`` prints (:func:`folder_info`)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..core.modeling_svdkit import summary
from ..errors import SvdkitError
from .format import read_svdkit_config

__all__ = [
    "weight_files",
    "tensor_shapes",
    "dense_bytes",
    "record_problems",
    "read_folder",
    "check_folder",
    "folder_info",
    "natural_key",
    "QUANTIZED_TENSORS",
    "compression_words",
]


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files transformers loads from `folder`: those of model.safetensors.index.json, else
    model.safetensors (other files, such as a consolidated.safetensors or an adapter beside them, are not
    the model's)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SvdkitError(f"'{index}' is not a valid safetensors index: {e}") from e
        return [folder / name for name in sorted(names)]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []


def tensor_shapes(folder: str | Path) -> dict[str, list[int]]:
    """Tensor name -> shape over the weight files of `folder`; a missing, truncated or corrupt file is an error."""
    shapes: dict[str, list[int]] = {}
    for f in weight_files(folder):
        try:
            with safe_open(f, "pt") as st:
                for key in st.keys():
                    shapes[key] = list(st.get_slice(key).get_shape())
        except (SafetensorError, OSError) as e:
            raise SvdkitError(f"'{f}' is not a readable safetensors file (truncated or corrupt?): {e}") from e
    return shapes


def dense_bytes(folder: str | Path, ratio: float = 0.0, element_bytes: int = 4) -> int | None:
    """Bytes of the dense model in `folder` once loaded with `element_bytes` per element (4: float32),
    from the safetensors headers, less `ratio` of every matrix inside a decoder layer (what compressing at
    that ratio removes); a low-rank pair (``X.A`` k x n, ``X.B`` m x k) counts as the m x n matrix it
    stands for. None where `folder` is not a folder of safetensors files."""
    shapes = tensor_shapes(folder) if Path(folder).is_dir() else {}
    if not shapes:
        return None
    elements = 0.0
    for key, shape in shapes.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "A" and f"{module}.B" in shapes:
            continue  # counted with its B
        a = shapes.get(f"{module}.A") if leaf == "B" else None
        size = shape[0] * a[1] if a is not None else math.prod(shape)
        in_layer = _in_decoder_layer(module) and (a is not None or len(shape) == 2)
        elements += size * (1 - ratio) if in_layer else size
    return int(element_bytes * elements)


def _in_decoder_layer(module: str) -> bool:
    """Whether a module name lies inside a numbered block (``model.layers.3.mlp.up_proj``), read from the
    name alone (no model is loaded here)."""
    return re.search(r"\.\d+\.", module) is not None


def record_problems(ranks: dict[str, int], shapes: dict[str, list[int]], quantized: dict | None = None) -> list[str]:
    """How the weights disagree with the recorded ranks: a recorded module without factors of its rank (or,
    with a recorded `quantized`, without its quantized base), factors of a module the record does not list, or a
    dense weight beside a recorded rank."""
    problems = []
    for name, rank in ranks.items():
        if quantized and not all(name + t in shapes for t in QUANTIZED_TENSORS):
            problems.append(f"{name} has a quantized base in the record but no {name}.qweight/.scales in the weights")
        a, b = shapes.get(f"{name}.A"), shapes.get(f"{name}.B")
        if a is None or b is None:
            problems.append(f"{name} has rank {rank} in the record but no factors {name}.A/{name}.B in the weights")
        elif len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            problems.append(f"{name} has rank {rank} in the record but factors A {a} and B {b} in the weights")
        if f"{name}.weight" in shapes:
            problems.append(f"{name} has rank {rank} in the record but a dense {name}.weight in the weights")
    unlisted = {key.removesuffix(".A") for key in shapes if key.endswith(".A") and _factors(shapes, key[:-2])}
    problems += [
        f"{name} has factors in the weights but no rank in the record" for name in sorted(unlisted - set(ranks))
    ]
    return problems


def _factors(shapes: dict[str, list[int]], module: str) -> bool:
    """Whether `module`.A and `module`.B are a pair of factors (matrices that chain), not parameters that
    happen to be named so (Doge's self_attn.A)."""
    a, b = shapes.get(f"{module}.A"), shapes.get(f"{module}.B")
    return a is not None and b is not None and len(a) == 2 and len(b) == 2 and a[0] == b[1]


def read_folder(folder: str | Path) -> tuple[dict | None, dict[str, list[int]]]:
    """(svdkit record or None, tensor shapes) of a model folder whose weight files are readable (any model)
    and, for an svdkit folder, agree with its record; otherwise an error naming the file or the modules."""
    record = read_svdkit_config(folder)
    shapes = tensor_shapes(folder)
    if record is None:
        return None, shapes
    if not shapes:
        raise SvdkitError(f"'{folder}' has no .safetensors weights")
    problems = record_problems(record["ranks"], shapes, record.get("quantized"))
    if problems:
        raise SvdkitError(
            f"'{folder}' is an inconsistent svdkit folder, its weights do not match the ranks in config.json: "
            f"{summary(problems)}. The folder is damaged: compress the model again"
        )
    return record, shapes


def check_folder(folder: str | Path) -> dict | None:
    """:func:`read_folder`'s checks; the svdkit record, None for an ordinary model."""
    return read_folder(folder)[0]


def folder_info(folder: str | Path) -> dict:
    """Method, ratio, ranks and parameter counts of a saved folder, read without loading the model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SvdkitError(f"'{folder}' is not a folder")
    record, all_shapes = read_folder(folder)
    if record is None:
        raise SvdkitError(f"'{folder}' is not an svdkit-compressed model folder (no svdkit record in config.json)")
    ranks = record["ranks"]
    shapes, dense_kept = {}, []
    kinds = {re.sub(r"^.*\.\d+\.", "", name) for name in ranks}
    for key, shape in all_shapes.items():
        module, _, leaf = key.rpartition(".")
        if module in ranks and leaf == "B":
            shapes[module] = [shape[0], all_shapes[f"{module}.A"][1]]
        elif leaf == "weight" and len(shape) == 2 and re.sub(r"^.*\.\d+\.", "", module) in kinds:
            if _in_decoder_layer(module):  # a target type kept dense
                shapes[module] = shape
                dense_kept.append(module)
    return {
        "method": record.get("method"),
        "ratio": record.get("ratio"),
        "params": sum(math.prod(shape) for key, shape in all_shapes.items() if not key.endswith(QUANTIZED_TENSORS)),
        "quantized": record.get("quantized"),
        "params_dense": record.get("params_dense"),
        "ranks": ranks,
        "version": record.get("version"),
        "allocation": record.get("allocation"),
        "update": record.get("update", "none"),
        "kv_ratio": record.get("kv_ratio"),
        "training": record.get("training"),
        "heal": record.get("heal") or [],
        "calibration": record.get("calibration"),
        "shapes": dict(sorted(shapes.items(), key=lambda kv: natural_key(kv[0]))),
        "dense_kept": sorted(dense_kept, key=natural_key),
    }


QUANTIZED_TENSORS = (".qweight", ".scales")
"""the tensors of a quantized base (QuantLowRankLinear's buffers): integer codes and their scales, no parameters"""


def compression_words(record: dict) -> str:
    """How a record's model was compressed, in words: its parameter ratio, or its quantized base."""
    quantized = record.get("quantized")
    if quantized:
        article = "an" if quantized["bits"] == 8 else "a"
        return f"{article} {quantized['bits']}-bit base in blocks of {quantized['block']} plus low-rank corrections"
    return f"ratio {record.get('ratio')}"


def natural_key(name: str) -> tuple:
    """Sort key that puts layer 2 before layer 10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))
