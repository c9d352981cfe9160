"""The statistics store on disk: the same statistics as in memory, shared Gram matrices, cleaned up."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model

import svdkit

pytestmark = pytest.mark.usefixtures("float64_default")


def test_store_round_trip_matches_memory_and_cleans_up(tmp_path):
    from svdkit.calibration.collect import collect_statistics
    from svdkit.calibration.store import StatisticsStore
    from svdkit.sources.text import calibration_windows

    model = tiny_model("llama")
    arch = svdkit.find_architecture(model)
    windows = calibration_windows(random_tokens(4 * 32, seed=1), 4, 32)
    mem = collect_statistics(model, arch, windows, {"gram", "mean_abs"}, torch.device("cpu"), progress=False)
    with StatisticsStore(tmp_path) as store:
        got = collect_statistics(model, arch, windows, {"gram", "mean_abs"}, torch.device("cpu"), False, store=store)
        assert got is store and sorted(store) == sorted(mem) and len(store) == len(mem)
        for name, st in mem.items():
            assert torch.equal(store[name]["gram"], st["gram"]) and store[name].tokens == st.tokens
            assert torch.equal(store[name].mean_abs, st.mean_abs)
        # q/k/v share one Gram matrix: it is written once per layer
        assert store.bytes < 2 * sum(
            st["gram"].numel() * 8
            for n, st in mem.items()
            if n.endswith(("q_proj", "o_proj", "gate_proj", "down_proj"))
        )
        store.add("model.layers.0.self_attn.q_proj", {"fisher": torch.ones(64)}, 128)
        assert (
            "fisher" in store["model.layers.0.self_attn.q_proj"] and "gram" in store["model.layers.0.self_attn.q_proj"]
        )
        folder = store.path
        assert folder.parent == tmp_path and any(folder.iterdir())
    assert not folder.exists()
