"""The layer engine: the walk's hidden states equal a full forward's, work sees every layer in order with its
inputs and may set the next ones, a source starts late and is told each finished layer, a two-stream walk
needs its dense stream advanced, a walk without activations runs no layer."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model

from svdkit import find_architecture
from svdkit.engine import LayerSource, captured, layer_bounds, walk_layers

CPU = torch.device("cpu")


def windows(n: int = 2, length: int = 24) -> torch.Tensor:
    return random_tokens(n * length).reshape(n, length)


def test_layer_bounds_are_the_full_forwards_hidden_states():
    model = tiny_model()
    arch = find_architecture(model)
    ids = windows(1)
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states
    with captured(model, arch, ids, CPU, progress=False) as inputs:
        bounds = layer_bounds(arch, inputs, inputs.hidden[0], CPU)
    assert len(bounds) == len(arch.layers) + 1
    for got, want in zip(bounds[:-1], reference[:-1], strict=True):  # the last hidden state is after the norm
        assert torch.allclose(got, want, atol=1e-6)


class Recording(LayerSource):
    def __init__(self, start: int) -> None:
        self.start, self.events = start, []

    def begin(self, hidden, dense):
        self.events.append(("begin", len(hidden)))
        return [h * 0 for h in hidden], dense

    def load(self, index, layer):
        self.events.append(("load", index))

    def records(self):
        return [{"work": "before"}]

    def done(self, index, layer, hidden, dense, record):
        self.events.append(("done", index, float(hidden[0].abs().sum()), record))


def test_work_sees_each_layer_once_from_the_sources_start_and_may_set_the_next_inputs():
    model = tiny_model()
    arch = find_architecture(model)
    source, seen = Recording(start=1), []

    def work(step):
        seen.append((step.index, step.name, float(step.hidden[0].abs().sum())))
        step.next_hidden = [torch.full_like(h, 2.0) for h in step.hidden]
        step.record["work"] = step.index

    with captured(model, arch, windows(), CPU, progress=False) as inputs:
        walked = walk_layers(arch, CPU, [work], inputs, source=source, progress=False)
    n = len(arch.layers)
    assert [i for i, _, _ in seen] == list(range(1, n))
    assert seen[0][1] == f"{arch.layers_path}.1." and seen[0][2] == 0.0  # begin's hidden states entered layer 1
    assert source.events[0] == ("begin", 2) and [e[0] for e in source.events[1:]] == ["load", "done"] * (n - 1)
    assert source.events[-1][-1] == {"work": n - 1}
    assert walked.records == [{"work": "before"}, *({"work": i} for i in range(1, n))]
    assert all(torch.equal(h, torch.full_like(h, 2.0)) for h in walked.hidden) and walked.dense is None


def test_a_two_stream_walk_needs_its_work_to_advance_the_dense_stream():
    model = tiny_model()
    arch = find_architecture(model)
    with captured(model, arch, windows(), CPU, progress=False) as inputs:
        with pytest.raises(RuntimeError, match="next_dense"):
            walk_layers(arch, CPU, [lambda step: None], inputs, keep_dense=True, progress=False)

        def dense_twice(step):
            assert all(torch.equal(a, b) for a, b in zip(step.hidden, step.dense, strict=True))  # nothing changes
            step.next_dense = step.outputs(step.dense)

        walked = walk_layers(arch, CPU, [dense_twice], inputs, keep_dense=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(walked.hidden, walked.dense, strict=True))


def test_a_walk_without_activations_runs_no_layer_and_moves_none():
    model = tiny_model()
    arch = find_architecture(model)
    calls, seen = [], []
    handles = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in arch.layers]
    walked = walk_layers(arch, torch.device("meta"), [lambda step: seen.append((step.index, step.hidden))])
    for h in handles:
        h.remove()
    assert seen == [(i, None) for i in range(len(arch.layers))] and not calls and walked.hidden is None
    assert all(p.device == CPU for p in model.parameters())
