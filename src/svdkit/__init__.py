"""svdkit: SVD-based post-training compression of causal language models, measured on one protocol.

    import svdkit
    model, tok = svdkit.load_model("smollm2-135m")
    svdkit.compress(model, tok, method="svd-llm", ratio=0.2, calib="demo")  # or allocation="sensitivity"
    svdkit.save(model, tok, "out")
    model, tok = svdkit.load("out")
    svdkit.perplexity(model, tok, "demo", seqlen=512, max_windows=4)

Importing svdkit registers its saved format with transformers, so
``AutoModelForCausalLM.from_pretrained(folder)`` loads a compressed folder as a low-rank model.
"""

from . import startup  # noqa: F401  (first: in svdkit's command line, an interrupt while importing is one line)
from .allocators import allocator_names
from .allocators.uniform import allocate_uniform
from .core.architecture import find_architecture
from .core.lowrank import LowRankLinear, count_parameters
from .core.ranks import rank_for_ratio
from .deploy.onnx import export_onnx
from .errors import SvdkitError, SvdkitWarning
from .measure.perplexity import PerplexityResult, perplexity
from .methods import get_method, method_names, register
from .pipeline.compress import CompressionResult, compress
from .saved.folder import densify, save
from .saved.format import register_format
from .sources.models import load, load_model
from .version import __version__

register_format()  # AutoModelForCausalLM.from_pretrained(folder) builds the low-rank model once svdkit is imported

__all__ = [
    "CompressionResult",
    "LowRankLinear",
    "PerplexityResult",
    "SvdkitError",
    "SvdkitWarning",
    "__version__",
    "allocate_uniform",
    "allocator_names",
    "compress",
    "count_parameters",
    "densify",
    "export_onnx",
    "find_architecture",
    "get_method",
    "load",
    "load_model",
    "method_names",
    "perplexity",
    "rank_for_ratio",
    "register",
    "save",
]
