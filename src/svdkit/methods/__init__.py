"""Compression methods: one file per registered name (``svd-llm`` is svd_llm.py); SoCo, which trains,
is a folder. Importing this package registers them all."""

from . import asvd, fwsvd, nsvd, nsvd2, qlr, soco, svd, svd_llm, svd_llm_v2  # noqa: F401  (registration)
from .base import METHODS, Factors, Method, MethodTraining, factorize, get_method, make_config, method_names, register

__all__ = [
    "METHODS",
    "Factors",
    "Method",
    "MethodTraining",
    "factorize",
    "get_method",
    "make_config",
    "method_names",
    "register",
]
