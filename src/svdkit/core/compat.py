"""What differs between the transformers releases svdkit declares (``transformers>=5.0,<6``), in one place.

transformers 5.24 renamed the KV-cache argument of every model, decoder layer and attention forward
(and of ``generate``) from ``past_key_values`` to ``cache``, and model outputs carry it as ``.cache``;
the old name is still accepted with a FutureWarning until 5.40. svdkit passes and reads the cache under
whichever name the installed release uses, read from the forward's signature, so it neither depends on
the deprecated alias nor breaks when it is removed. transformers 5.0 picks an attention kernel by
indexing ``ALL_ATTENTION_FUNCTIONS``; 5.1 added ``get_interface``, which also checks the name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import transformers

from ..errors import SvdkitError

__all__ = ["CACHE_NAMES", "attention_function", "cache_kwarg", "cache_kwargs", "output_cache", "transformers_version"]

CACHE_NAMES = ("cache", "past_key_values")  # newest first


def transformers_version() -> str:
    return transformers.__version__


def cache_kwarg(forward: Callable[..., Any]) -> str:
    """The name under which `forward` (a model's or an attention's) takes the KV cache.

    Raises SvdkitError when it takes none of the known names: a transformers release svdkit does not know.
    """
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError) as e:
        raise SvdkitError(f"cannot read the signature of {forward!r} ({e})") from None
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise SvdkitError(
        f"{getattr(forward, '__qualname__', forward)} takes its KV cache under none of the names svdkit knows "
        f"({', '.join(CACHE_NAMES)}) in transformers {transformers_version()}: install a transformers release "
        "in svdkit's tested range (see requirements/lock.txt)"
    )


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` to pass a KV cache to `model`'s forward or ``generate`` under the name it takes."""
    return {cache_kwarg(model.forward): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries (``.cache`` from 5.24, ``.past_key_values`` before), or None."""
    for name in CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def attention_function(implementation: str | None, eager: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' attention kernel for a config's ``_attn_implementation``, `eager` for "eager" (or None)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # seconds to import: only when attention runs

    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    return eager if implementation in (None, "eager") else ALL_ATTENTION_FUNCTIONS[implementation]
