"""Run a model exported by :func:`svdkit.deploy.export_onnx` with ONNX Runtime, the way svdkit runs a torch model.

The folder holds one graph for prefill and decode: inputs ``input_ids`` and ``position_ids`` (batch 1), the
positions whose logits are wanted (``logits_to_keep``; an export made before it existed computes every
position's) and the KV cache of every layer (``input.cache.*``); outputs the logits and the grown cache
(``output.cache.*``, fed back by name). A prefill is the same graph on an empty cache. :class:`OnnxCausalLM`
gives what svdkit's perplexity and generation checks call on a model: ``model(input_ids=...).logits``,
``generate``, ``config``, ``device``; the timing of the last ``generate`` (prompt and decode apart) is in
``last_timing``, and ``timed_runs`` gives what a speed measurement times. Code outside this folder tells it from a
torch model as what is not an ``nn.Module`` (``runtime`` names it), never by its class.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from transformers import GenerationConfig

from ..core.device import resolve_device
from ..errors import SvdkitError

__all__ = [
    "KEEP",
    "MANIFEST",
    "OnnxCausalLM",
    "empty_cache",
    "is_onnx_folder",
    "place",
    "prefill_feeds",
    "read_manifest",
    "require_onnxruntime",
]

KEEP = "logits_to_keep"
"""the graph input of the positions (1-D, int64) whose logits it computes"""
MANIFEST = "svdkit_onnx.json"
"""the file that marks an svdkit ONNX export: graph file, cache inputs and their empty values, what was exported"""


def is_onnx_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise SvdkitError(f"'{path}': unreadable {MANIFEST} ({e}): export the model again") from None


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise SvdkitError("running an ONNX export needs onnxruntime: pip install 'svdkit[onnx]'") from None
    return onnxruntime


def place(model, device) -> torch.device:
    """Move `model` to `device` ('auto': CUDA when present) and return where it runs; an ONNX export runs on
    the CPU, and asking for another device by name is refused."""
    if isinstance(model, OnnxCausalLM):
        if device not in (None, "auto") and resolve_device(device).type != "cpu":
            raise SvdkitError(
                f"an ONNX export runs on ONNX Runtime's CPU provider here, not on '{device}': use --device cpu"
            )
        return model.device
    dev = resolve_device(device)
    model.to(dev)
    return dev


def empty_cache(cache: dict[str, dict]) -> dict[str, np.ndarray]:
    """The cache inputs of a manifest's ``cache`` entry at zero tokens (scalars as recorded)."""
    out = {}
    for name, spec in cache.items():
        if "value" in spec:
            out[name] = np.array(spec["value"], dtype=spec["dtype"])
        else:
            out[name] = np.zeros(spec["shape"], dtype=spec["dtype"])
    return out


def prefill_feeds(ids: np.ndarray, cache: dict[str, dict]) -> dict[str, np.ndarray]:
    """The graph's inputs for a prefill of `ids` (1, n) on an empty cache, the last position's logits only."""
    n = ids.shape[1]
    feeds = {"input_ids": ids, "position_ids": np.arange(n, dtype=np.int64)[None]}
    return {**feeds, KEEP: np.arange(n - 1, n, dtype=np.int64), **empty_cache(cache)}


class OnnxCausalLM:
    """An exported causal LM in an ONNX Runtime session (CPU), batch 1 per graph call."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        ort = require_onnxruntime()
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        graph = self.folder / self.manifest["graph"]
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a bad or missing file
            raise SvdkitError(f"ONNX Runtime could not open '{graph}': {str(e).splitlines()[0]}") from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.selects = KEEP in {i.name for i in self.session.get_inputs()}
        self.config = SimpleNamespace(**self.manifest["config"])
        self.device = torch.device("cpu")
        self.runtime = "onnxruntime"
        self.training = False
        self.parameter_count = self.manifest["parameters"]
        self.last_timing: dict | None = None
        self.generation_config = GenerationConfig()
        if (self.folder / "generation_config.json").is_file():
            self.generation_config = GenerationConfig.from_pretrained(self.folder)

    # the parts of the nn.Module interface svdkit's measurements call
    def eval(self) -> OnnxCausalLM:
        return self

    def train(self, mode: bool = True) -> OnnxCausalLM:
        return self

    def to(self, device) -> OnnxCausalLM:
        """Stays on ONNX Runtime's CPU provider (:func:`place` refuses a GPU asked for by name)."""
        return self

    def timed_runs(self, ids: torch.Tensor, new_tokens: int, prompt: int) -> dict[str, tuple]:
        """What :mod:`svdkit.measure.speed` times, as (work, tokens it counts): prefill, forward and (if
        `new_tokens`) decode of the 1-D token ids `ids` (decode from its first `prompt` tokens)."""
        x, p = ids[None].numpy(), ids[None, :prompt]
        runs = {
            "prefill_tok_s": (lambda: self.step(x, self.empty_cache(), 0, last=True), ids.numel()),
            "forward_tok_s": (lambda: self.step(x, self.empty_cache(), 0), ids.numel()),
        }
        if new_tokens:
            gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None)
            runs["decode_tok_s"] = (lambda: self.generate(p, **gen), new_tokens)
        return runs

    def empty_cache(self) -> dict[str, np.ndarray]:
        """Every cache input at zero tokens (scalars, such as a sliding window's size, as recorded)."""
        return empty_cache(self.manifest["cache"])

    def step(
        self, ids: np.ndarray, cache: dict[str, np.ndarray], start: int, last: bool = False
    ) -> tuple[np.ndarray, dict]:
        """Logits (1, n, vocab) of `ids` (1, n) after `start` cached tokens (with `last`, those of the last
        position only, (1, 1, vocab)), and the grown cache."""
        n = ids.shape[1]
        feeds = {"input_ids": ids, "position_ids": np.arange(start, start + n, dtype=np.int64)[None]}
        if self.selects:
            feeds[KEEP] = np.arange(n - 1 if last else 0, n, dtype=np.int64)
        feeds.update(cache)
        out = dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))
        grown = {n.replace("output.", "input.", 1): v for n, v in out.items() if n.startswith("output.")}
        return out["logits"], grown

    def __call__(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        """Logits of every position of each row of `input_ids` (each row its own prefill)."""
        rows = [self.step(row[None].cpu().numpy(), self.empty_cache(), 0)[0] for row in input_ids]
        return SimpleNamespace(logits=torch.from_numpy(np.concatenate(rows)))

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        min_new_tokens: int = 0,
        eos_token_id: int | list[int] | None = -1,
        pad_token_id: int | None = None,
        **_,
    ) -> torch.Tensor:
        """Greedy continuations (the KV cache on), row by row; a row stops at an end token after
        `min_new_tokens` and is padded with `pad_token_id` to the longest row; the end tokens default to the
        generation config's. Sampling is not supported."""
        if input_ids.shape[-1] == 0:
            raise SvdkitError("generation needs a prompt of at least one token; the prompt is empty")
        if eos_token_id == -1:
            eos_token_id = self.generation_config.eos_token_id
        ends = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        pad = pad_token_id if pad_token_id is not None else 0
        rows, prefill_s, decode_s, decoded = [], 0.0, 0.0, 0
        for row in input_ids.cpu().numpy():
            start = time.perf_counter()
            logits, cache = self.step(row[None], self.empty_cache(), 0, last=True)
            prefill_s += time.perf_counter() - start
            new, start = [int(logits[0, -1].argmax())], time.perf_counter()
            while len(new) < max_new_tokens and not (new[-1] in ends and len(new) >= min_new_tokens):
                logits, cache = self.step(np.array([[new[-1]]]), cache, len(row) + len(new) - 1)
                new.append(int(logits[0, -1].argmax()))
            decode_s += time.perf_counter() - start
            decoded += len(new) - 1
            rows.append(list(row) + new)
        self.last_timing = {"prompt_s": prefill_s, "decode_s": decode_s, "decoded_tokens": decoded}
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])
