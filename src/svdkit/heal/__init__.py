"""Healing: after any method (SoCo included), train the factors back toward the dense model at the same
ranks. One file per healer, its file name its registry name: ``block`` (block-wise output matching) and
``kd`` (distillation). Importing this package registers them."""

from . import block, kd  # noqa: F401  (registration)
from .base import HEALERS, HealContext, Healer, LayerHealing, healer_names, parse_heal, register
from .guard import Guard, split_windows, steps_for
from .reference import DenseReference

__all__ = [
    "HEALERS",
    "DenseReference",
    "Guard",
    "HealContext",
    "Healer",
    "LayerHealing",
    "healer_names",
    "parse_heal",
    "register",
    "split_windows",
    "steps_for",
]
