"""Compression methods, registered by name (importing this package registers them all)."""

from . import asvd, fwsvd, nsvd, soco, svd, svd_llm, svd_llm_v2  # noqa: F401  (registration side effects)
from .registry import Factors, Method, ModelStage, factorize, get_method, make_config, method_names, register

__all__ = ["Factors", "Method", "ModelStage", "factorize", "get_method", "make_config", "method_names", "register"]
