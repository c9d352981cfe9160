"""Deployment: the ONNX Runtime export (:mod:`.onnx`, :func:`svdkit.export_onnx`) and its runner
(:mod:`.runtime`)."""

from .runtime import OnnxCausalLM, is_onnx_folder

__all__ = ["OnnxCausalLM", "is_onnx_folder"]
