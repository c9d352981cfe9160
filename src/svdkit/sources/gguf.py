"""GGUF files as plain float models.

transformers loads a ``.gguf`` file as a gguf-"quantized" model, which it refuses to save ("not
serializable"). svdkit rebuilds it from its config without the quantization record and copies the
dequantized weights in: an ordinary model that compresses, saves and densifies like any other. The
bundled SmolLM2 alias and any ``.gguf`` given as MODEL go through this one conversion.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import quantization_config as hf_quantization

__all__ = ["float_from_gguf", "convert_gguf"]


def _dequantized() -> dict:
    """from_pretrained arguments that make transformers unpack every GGUF weight into a float tensor.

    Newer transformers releases may keep the weights in their GGUF blocks when a matmul kernel is
    installed; ``GgufConfig(dequantize=True)`` asks for floats. Releases without that option always unpack.
    """
    config = getattr(hf_quantization, "GgufConfig", None)
    if config is None or "dequantize" not in inspect.signature(config).parameters:
        return {}
    return {"quantization_config": config(dequantize=True)}


def float_from_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a ``.gguf`` file, the model an ordinary float one with no quantization record."""
    path = Path(path)
    where = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **where)
    quant = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **where, **_dequantized())
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(quant.state_dict())
    return model.eval(), tokenizer


def convert_gguf(path: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Write a ``.gguf`` file as a plain Hugging Face folder (float32 safetensors and the tokenizer)."""
    model, tokenizer = float_from_gguf(path)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
