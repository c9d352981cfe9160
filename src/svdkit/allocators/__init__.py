"""Rank allocators: one file per registered name. Importing this package registers them all."""

from . import bytes, sensitivity, uniform, v2  # noqa: F401  (registration)
from .base import (
    ALLOCATORS,
    AllocationContext,
    Allocator,
    allocator_names,
    get_allocator,
    make_allocation_config,
    register_allocator,
)

__all__ = [
    "ALLOCATORS",
    "AllocationContext",
    "Allocator",
    "allocator_names",
    "get_allocator",
    "make_allocation_config",
    "register_allocator",
]
