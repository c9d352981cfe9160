"""The dense model beside the compressed one: the dense linears the factor stage replaced, swapped back in
when a healer needs the dense model's outputs (a decoder layer's, or the teacher's logits)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import nn

__all__ = ["DenseReference"]


class DenseReference:
    """The dense modules of the compressed targets, by full module name (kept, not copied, by the factor stage)."""

    def __init__(self, modules: Mapping[str, nn.Module] | None = None) -> None:
        self.modules: dict[str, nn.Module] = dict(modules or {})

    def keep(self, name: str, module: nn.Module) -> None:
        self.modules[name] = module

    def forget(self, prefix: str) -> None:
        """Drop the dense modules under `prefix` (e.g. ``model.layers.3.``): that layer is healed."""
        for name in [n for n in self.modules if n.startswith(prefix)]:
            del self.modules[name]

    def to(self, device) -> None:
        """Move the dense modules (e.g. to the device the model trains on)."""
        for module in self.modules.values():
            module.to(device)

    def __len__(self) -> int:
        return len(self.modules)

    @contextmanager
    def swapped(self, model: nn.Module, prefix: str = "") -> Iterator[nn.Module]:
        """Within the block, `model` (or the submodule at `prefix`, e.g. one decoder layer) runs with its dense
        modules back in place; the compressed ones return afterwards, even on error."""
        root = model.get_submodule(prefix) if prefix else model
        head = prefix + "." if prefix else ""
        names = [n for n in self.modules if n.startswith(head)]
        kept = {}
        try:
            for name in names:
                local = name[len(head) :]
                kept[local] = root.get_submodule(local)
                root.set_submodule(local, self.modules[name])
            yield root
        finally:
            for local, module in kept.items():
                root.set_submodule(local, module)
