"""Where a model's compressible parts are, found structurally, never by model name.

The decoder is the largest ``nn.ModuleList`` of identical blocks that contain ``nn.Linear`` layers, and
the targets are the ``nn.Linear`` modules inside each block (or the :class:`LowRankLinear` that replaced
them, so a compressed model's targets are found too). Embeddings and ``lm_head`` sit outside the
blocks, so they are never decomposed (they are often tied).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import SvdkitError
from .lowrank import LowRankLinear

__all__ = ["Architecture", "find_architecture", "EXPECTED"]

EXPECTED = "decoder blocks (an nn.ModuleList of identical layers) holding nn.Linear projections, e.g. "
EXPECTED += "self_attn.q_proj/k_proj/v_proj/o_proj and mlp.gate_proj/up_proj/down_proj"
_LINEAR = (nn.Linear, LowRankLinear)


@dataclass
class Architecture:
    """Where the decoder layers are and which linear layers inside each one are compressed."""

    layers_path: str
    layers: nn.ModuleList
    targets: list[str]
    """names relative to a decoder layer, e.g. 'self_attn.q_proj'"""

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Full module name -> (out_features, in_features)."""
        out = {}
        for i, layer in enumerate(self.layers):
            for t in self.targets:
                mod = layer.get_submodule(t)
                out[f"{self.layers_path}.{i}.{t}"] = (mod.out_features, mod.in_features)
        return out


def find_architecture(model: nn.Module, targets: Sequence[str] | None = None) -> Architecture:
    """Locate the decoder layers and the linear targets (nn.Linear, or LowRankLinear) inside them.

    `targets`, if given, keeps only projections whose name ends with one of these strings
    (e.g. ``["q_proj", "k_proj"]``).
    """
    candidates = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        first = type(mod[0])
        if all(type(m) is first for m in mod) and any(isinstance(s, _LINEAR) for s in mod[0].modules()):
            candidates.append((sum(p.numel() for p in mod.parameters()), name, mod))
    if not candidates:
        raise SvdkitError(f"unsupported architecture {type(model).__name__}: expected {EXPECTED}")
    _, path, layers = max(candidates, key=lambda c: c[0])
    names = [n for n, m in layers[0].named_modules() if isinstance(m, _LINEAR)]
    if targets:
        names = [n for n in names if any(n.endswith(t) for t in targets)]
        if not names:
            raise SvdkitError(f"no linear layer in {path}.0 matches targets {list(targets)}")
    for i, layer in enumerate(layers):
        found = [n for n, m in layer.named_modules() if isinstance(m, _LINEAR)]
        missing = [n for n in names if n not in found]
        if missing:
            raise SvdkitError(f"decoder layer {path}.{i} lacks {missing}: layers differ, which is unsupported")
    return Architecture(path, layers, names)
