"""Caching the low-rank latent of k_proj / v_proj instead of the keys and values (ASVD's KV-cache reduction).

ASVD (Yuan et al., 2023, "ASVD: Activation-aware Singular Value Decomposition for Compressing Large
Language Models", sec. 3.4): once k_proj is low-rank, K = B_k (A_k x) + b_k, the cache can keep the
r_k-dimensional latent A_k x of each token instead of its n_kv * head_dim key numbers, and rebuild the
keys through B_k (then apply the rotary embedding) when attention needs them; the same for v_proj.
Per token and layer the cache then holds r_k + r_v numbers instead of 2 n_kv head_dim. The price is
the reconstruction: one (L x r) by (r x n_kv head_dim) product per projection, layer and step for a
context of L tokens, plus the rotary embedding of all L keys.

:func:`enable_latent_kv_cache` switches a model's attention modules to this path (their class is
swapped for a subclass with the latent forward; parameters and state-dict names are unchanged, so the
model saves and loads as before); :func:`disable_latent_kv_cache` switches back. The latents live in
the ordinary :class:`~transformers.DynamicCache` that ``generate()`` creates, as (batch, 1, L, r)
tensors, so greedy search, sampling and beam search work unchanged.

Positions: keys are rotated after reconstruction at their cache slot 0..L-1, and queries at theirs;
``position_ids`` given to the model are not used. Rotary attention scores depend only on position
differences, so this equals the ordinary path exactly when positions are the cache slots (any
unpadded input) and up to rounding when they are shifted by a constant per row (a left-padded batch:
``generate`` counts positions from each row's first real token). Positions with gaps or resets
(packed sequences) are not supported. The latents are computed from the factors directly
(``x A^T``), so forward hooks on k_proj / v_proj do not run on this path. Rope types whose
frequencies change with the context length (``dynamic``, ``longrope``), sliding-window attention and
static caches are refused with a clear error.

:func:`kv_ranks` is the method-independent rule for a KV-cache target: reduction rho keeps rank
r = floor((1 - rho) m) of each m-row k/v matrix, so the cache shrinks by at least rho whatever the
matrix's shape. On a GQA model k/v are narrow (SmolLM2-135M: 192 x 576), so their parameter
break-even rank m n / (m + n) = 144 is reached already at rho = 0.25: below that reduction the pair
costs more parameters than the dense matrix, and only the cache shrinks.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache

from ..core.compat import CACHE_NAMES, attention_function, cache_kwargs, transformers_version
from ..core.lowrank import LowRankLinear
from ..core.ranks import check_fraction
from ..errors import SvdkitError

__all__ = [
    "KV_MODES",
    "check_kv_ratio",
    "KV_TARGETS",
    "SUPPORTED_ATTENTION",
    "kv_rank",
    "kv_ranks",
    "enable_latent_kv_cache",
    "latent_kv_problem",
    "disable_latent_kv_cache",
    "latent_kv_enabled",
    "kv_cache_bytes",
    "kv_bytes_per_token",
]

KV_MODES = ("ordinary", "latent")
KV_TARGETS = ("k_proj", "v_proj")
SUPPORTED_ATTENTION = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")
_VARYING_ROPE = ("dynamic", "longrope")
_ATTENTION_ARGS = ("hidden_states", "position_embeddings", "attention_mask")


def check_kv_ratio(kv_ratio: float) -> float:
    """Validate a KV-cache reduction: the fraction of the cache removed, in (0, 1)."""
    return check_fraction(kv_ratio, "kv_ratio", "the fraction of the KV cache removed")


def kv_rank(out_features: int, kv_ratio: float) -> int:
    """r = floor((1 - kv_ratio) m), at least 1: the latent width that removes at least kv_ratio of the cache."""
    return max(1, math.floor(out_features * (1.0 - check_kv_ratio(kv_ratio)) + 1e-9))


def kv_ranks(shapes: Mapping[str, tuple[int, int]], kv_ratio: float) -> dict[str, int]:
    """Module name -> latent rank for every k_proj / v_proj among `shapes` (name -> (out, in)), at most min(m, n)."""
    return {
        name: min(kv_rank(m, kv_ratio), n) for name, (m, n) in shapes.items() if name.rsplit(".", 1)[-1] in KV_TARGETS
    }


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, heads, L, d) rotated by cos/sin (b or 1, L, d), as transformers' apply_rotary_pos_emb."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


def _latent(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the cache keeps for one projection: A x for a low-rank one, the output itself for a dense one."""
    return F.linear(x, proj.A) if isinstance(proj, LowRankLinear) else proj(x)


def _expand(proj: nn.Module, latent: torch.Tensor) -> torch.Tensor:
    return F.linear(latent, proj.B, proj.bias) if isinstance(proj, LowRankLinear) else latent


def _check_cache(cache, index: int, width: int) -> None:
    """Refuse a cache that cannot hold this layer's latents: not a dynamic one, or filled by the other mode."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        kind = None
    elif index < len(layers):
        kind = type(layers[index])
    else:  # a DynamicCache() made without a config adds its layers on first use
        kind = getattr(cache, "layer_class_to_replicate", None)
    if kind is not DynamicLayer:
        got = type(cache).__name__ + ("" if kind is None else f" with {kind.__name__}")
        raise SvdkitError(
            f"the latent KV cache needs transformers' default DynamicCache, got {got}: drop "
            "cache_implementation or use kv_cache='ordinary'"
        )
    if index < len(layers):
        keys = layers[index].keys
        if isinstance(keys, torch.Tensor) and keys.numel() and (keys.shape[1] != 1 or keys.shape[-1] != width):
            raise SvdkitError(
                "this cache holds full keys and values (it was filled with kv_cache='ordinary'), not latents: "
                "start generation with a fresh cache after switching the KV-cache mode"
            )


def _refuse_unknown_cache(kwargs: Mapping) -> None:
    """A KV cache passed under a name the latent forward does not read would be ignored silently: refuse it."""
    for name, value in kwargs.items():
        if isinstance(value, Cache):
            raise SvdkitError(
                f"transformers {transformers_version()} passes the KV cache to attention as '{name}', which the "
                "latent KV cache does not read: use kv_cache='ordinary' or the transformers release in svdkit's lock"
            )


def _api_problem(attention: type, rotary: nn.Module) -> str | None:
    """What in this transformers release differs from what the latent forward uses, or None."""
    try:
        from transformers.cache_utils import DynamicLayer  # noqa: F401  (a name some releases may lack)
    except ImportError as e:
        return str(e)
    signature = inspect.signature(attention.forward)
    if not any(name in signature.parameters for name in CACHE_NAMES) or any(
        name not in signature.parameters for name in _ATTENTION_ARGS
    ):
        return f"{attention.__name__}.forward{signature}"
    if list(inspect.signature(rotary.forward).parameters)[:2] != ["x", "position_ids"]:
        return f"{type(rotary).__name__}.forward{inspect.signature(rotary.forward)}"
    if not all(callable(getattr(DynamicCache, a, None)) for a in ("update", "get_seq_length")):
        return "DynamicCache without update() and get_seq_length()"
    return None


class LatentKVAttention:
    """Mixin placed before a Llama-family attention class: the forward that caches the k/v latents."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention with the latent cache; the cache comes as `cache` (transformers 5.24+) or
        `past_key_values` (before), and a cache under any other name is refused, not ignored."""
        from transformers.models.llama.modeling_llama import eager_attention_forward  # slow to import: used here

        cache = cache if cache is not None else past_key_values
        _refuse_unknown_cache(kwargs)
        batch, length = hidden_states.shape[:2]
        query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim)
        if hasattr(self, "q_norm"):
            query = self.q_norm(query)
        query = query.transpose(1, 2)
        lat_k, lat_v = _latent(self.k_proj, hidden_states), _latent(self.v_proj, hidden_states)
        offset = 0
        if cache is not None:
            _check_cache(cache, self.layer_idx, lat_k.shape[-1])
            offset = cache.get_seq_length(self.layer_idx)
            lat_k, lat_v = cache.update(lat_k[:, None], lat_v[:, None], self.layer_idx)
            lat_k, lat_v = lat_k[:, 0], lat_v[:, 0]
        total = lat_k.shape[1]
        key = _expand(self.k_proj, lat_k).view(batch, total, -1, self.head_dim)
        if hasattr(self, "k_norm"):
            key = self.k_norm(key)
        key = key.transpose(1, 2)
        value = _expand(self.v_proj, lat_v).view(batch, total, -1, self.head_dim).transpose(1, 2)
        slots = torch.arange(total, device=hidden_states.device)[None]
        cos, sin = self._svdkit_rotary(value, slots)
        query = _rope(query, cos[:, offset:], sin[:, offset:])
        key = _rope(key, cos, sin)
        attend = attention_function(self.config._attn_implementation, eager_attention_forward)
        out, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(batch, length, -1).contiguous()
        return self.o_proj(out), weights


_CLASSES: dict[type, type] = {}
_HOMES = {
    "LlamaAttention": "transformers.models.llama.modeling_llama",
    "MistralAttention": "transformers.models.mistral.modeling_mistral",
    "Qwen2Attention": "transformers.models.qwen2.modeling_qwen2",
    "Qwen3Attention": "transformers.models.qwen3.modeling_qwen3",
}


def _latent_class(cls: type) -> type:
    if cls not in _CLASSES:
        name = f"Latent{cls.__name__}"
        _CLASSES[cls] = type(name, (LatentKVAttention, cls), {"__module__": __name__, "__qualname__": name})
    return _CLASSES[cls]


def __getattr__(name: str) -> type:
    """``svdkit.saved.kvcache.LatentLlamaAttention`` and the like, so that pickle finds the swapped classes."""
    base = name.removeprefix("Latent")
    if name.startswith("Latent") and base in _HOMES:
        return _latent_class(getattr(importlib.import_module(_HOMES[base]), base))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if all(hasattr(mod, p) for p in ("q_proj", *KV_TARGETS, "o_proj")) and type(mod).__name__.endswith("Attention")
    ]


def latent_kv_enabled(model: nn.Module) -> bool:
    """True when the model's attention modules cache the k/v latents."""
    return any(isinstance(mod, LatentKVAttention) for _, mod in _attention_modules(model))


def latent_kv_problem(model: nn.Module) -> str | None:
    """Why the latent KV cache cannot serve `model` (None: it can): the attention must be a supported
    Llama-family class without sliding window, the rotary embedding must have fixed frequencies, and at
    least one k_proj or v_proj must be low-rank (a dense one is cached whole, as before)."""
    attentions = _attention_modules(model)
    if not attentions:
        return f"{type(model).__name__} has no attention module with q_proj/k_proj/v_proj/o_proj"
    todo = [(name, mod) for name, mod in attentions if not isinstance(mod, LatentKVAttention)]
    for name, mod in todo:
        cls = type(mod).__name__
        if cls not in SUPPORTED_ATTENTION:
            supported = ", ".join(SUPPORTED_ATTENTION)
            return f"the latent KV cache supports {supported}; '{name}' is a {cls}: use kv_cache='ordinary'"
        if getattr(mod, "sliding_window", None) or (
            cls == "MistralAttention" and getattr(mod.config, "sliding_window", None)
        ):
            return f"'{name}' uses sliding-window attention, which the latent KV cache does not support"
    if any(hasattr(getattr(mod, p), "qweight") for _, mod in attentions for p in KV_TARGETS):
        return "k_proj / v_proj have a quantized base (qlr): a latent of A x alone would drop it"
    if not [n for n, mod in attentions for p in KV_TARGETS if isinstance(getattr(mod, p), LowRankLinear)]:
        return (
            "no k_proj or v_proj of this model is low-rank, so there is no latent to cache: compress them "
            "first (e.g. svdkit compress --kv-ratio 0.5)"
        )
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if len(rotaries) != 1:
        return f"the latent KV cache needs exactly one rotary embedding module, found {len(rotaries)}"
    for cls in {type(mod) for _, mod in todo}:
        if (problem := _api_problem(cls, rotaries[0])) is not None:
            return (
                f"the latent KV cache does not know the attention API of transformers {transformers_version()} "
                f"({problem}): use kv_cache='ordinary' or the transformers release in svdkit's lock"
            )
    rope_type = str(getattr(rotaries[0], "rope_type", "default"))
    if rope_type in _VARYING_ROPE:
        return (
            f"rope type '{rope_type}' changes its frequencies with the context length, so keys cannot be "
            "rotated after reconstruction: use kv_cache='ordinary'"
        )
    return None


def enable_latent_kv_cache(model: nn.Module) -> int:
    """Make `model` cache the latents A x of its low-rank k_proj / v_proj; returns how many attentions changed.
    Checks everything first (:func:`latent_kv_problem`) and changes nothing on error."""
    if (problem := latent_kv_problem(model)) is not None:
        raise SvdkitError(problem)
    rotary = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    todo = [mod for _, mod in _attention_modules(model) if not isinstance(mod, LatentKVAttention)]
    for mod in todo:
        mod.__class__ = _latent_class(type(mod))
        object.__setattr__(mod, "_svdkit_rotary", rotary)  # a reference, not a submodule
    return len(todo)


def disable_latent_kv_cache(model: nn.Module) -> int:
    """Undo :func:`enable_latent_kv_cache`; returns how many attention modules changed back."""
    count = 0
    for _, mod in _attention_modules(model):
        if isinstance(mod, LatentKVAttention):
            mod.__class__ = type(mod).__bases__[1]
            del mod.__dict__["_svdkit_rotary"]
            count += 1
    return count


def kv_cache_bytes(cache) -> int:
    """Bytes held by a transformers Cache's key and value tensors (latents included)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def kv_bytes_per_token(model: nn.Module, prompt: torch.Tensor) -> float:
    """Measured cache bytes per token per sequence: one forward over `prompt` (1-D ids) with a fresh cache."""
    dev = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prompt[None].to(dev), use_cache=True, **cache_kwargs(model, cache))
    return kv_cache_bytes(cache) / prompt.numel()
