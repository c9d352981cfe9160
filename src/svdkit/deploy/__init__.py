"""Deployment: the model card every written folder carries (:mod:`.card`), the ONNX Runtime export
(:mod:`.onnx`, :func:`svdkit.export_onnx`) and its runner (:mod:`.runtime`)."""

from .card import model_card
from .runtime import OnnxCausalLM, is_onnx_folder

__all__ = ["OnnxCausalLM", "is_onnx_folder", "model_card"]
