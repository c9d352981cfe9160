"""Memory independent of depth: once a streamed layer is written, nothing keeps its tensors (its compressed
weights, the dense weights block healing trained against, its inputs), so memory is one layer whatever the
depth; and the engine gives the heap's free pages back after each layer. benchmarks/depth_memory.py measures
resident memory per layer on larger shapes."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import TEXT, tiny_config

import svdkit.engine.walk
from svdkit.pipeline import streaming
from svdkit.pipeline.options import CalibrationSettings, CompressionOptions


def _folder(tmp_path, tokenizer, layers: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / "deep"
    model = AutoModelForCausalLM.from_config(tiny_config(num_hidden_layers=layers), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("heal", ["none", "block"])
def test_nothing_keeps_a_finished_layers_tensors(tmp_path, tiny_tokenizer, monkeypatch, heal):
    folder = _folder(tmp_path, tiny_tokenizer, layers=4)
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 4)
    watched_refs: list[tuple[str, weakref.ref]] = []
    leaks: list[tuple[int, str]] = []
    done, factor_keep = streaming.StreamedLayers.done, svdkit.heal.DenseReference.keep

    def watched(self, index, layer, hidden, dense, record):
        gc.collect()  # what is still alive now, while layer `index` is written, outlived its layer
        leaks.extend((index, what) for what, ref in watched_refs if ref() is not None)
        watched_refs.clear()
        watched_refs.extend((f"layer {index}: {k}", weakref.ref(p)) for k, p in layer.named_parameters())
        watched_refs.extend((f"inputs of layer {index + 1}", weakref.ref(h)) for h in hidden + (dense or []))
        done(self, index, layer, hidden, dense, record)

    def kept(self, name, module):
        watched_refs.append((f"the dense {name}", weakref.ref(module.weight)))  # healing trains against it
        factor_keep(self, name, module)

    monkeypatch.setattr(streaming.StreamedLayers, "done", watched)
    monkeypatch.setattr(svdkit.heal.DenseReference, "keep", kept)
    options = CompressionOptions(
        ratio=0.4, progress=False, device="cpu", heal=heal, calibration=CalibrationSettings(str(text), 4, 32)
    )
    streaming.compress_folder(folder, tmp_path / "out", options)
    assert leaks == []


def test_the_walk_gives_the_heaps_free_pages_back_after_each_layer(monkeypatch, tiny_folder):
    calls = []
    monkeypatch.setattr(svdkit.engine.walk, "trim_heap", lambda: calls.append(1))
    arch = svdkit.find_architecture(svdkit.load_model(tiny_folder)[0])
    svdkit.engine.walk_layers(arch, torch.device("cpu"), [], progress=False)
    assert len(calls) == len(arch.layers)
