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


def test_spill_estimate_is_a_lower_bound_close_to_what_is_written(tmp_path):
    from svdkit.calibration.collect import collect_statistics
    from svdkit.calibration.store import StatisticsStore, spill_bytes
    from svdkit.sources.text import calibration_windows

    model = tiny_model("llama")
    arch = svdkit.find_architecture(model)
    windows = calibration_windows(random_tokens(4 * 32, seed=1), 4, 32)
    with StatisticsStore(tmp_path) as store:
        collect_statistics(model, arch, windows, {"gram", "mean_abs"}, torch.device("cpu"), False, store=store)
        estimate = spill_bytes(arch.shapes(), {"gram", "mean_abs"})
        assert 0.6 * store.bytes <= estimate <= store.bytes  # o_proj's own input is not counted


def test_a_full_disk_while_spilling_is_a_clear_error(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from svdkit.calibration.statistics import LinearStats
    from svdkit.calibration.store import StatisticsStore

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("svdkit.calibration.store.save_file", full)
    with StatisticsStore(tmp_path) as store:
        with pytest.raises(svdkit.SvdkitError, match="cannot write calibration statistics .*No space left"):
            store.put_layer(0, {"a": LinearStats({"gram": torch.eye(3)}, 1)})
    assert list(tmp_path.iterdir()) == []


def test_a_new_store_sweeps_the_spill_of_a_killed_run(tmp_path):
    import os

    from conftest import dead_pid, mark_owner

    from svdkit.calibration.store import StatisticsStore
    from svdkit.core.disk import OWNER_FILE

    for name, pid in [("svdkit-stats-killed", dead_pid()), ("svdkit-stats-running", os.getpid())]:
        (tmp_path / name).mkdir()
        mark_owner(tmp_path / name, pid)
    (tmp_path / "svdkit-stats-unmarked").mkdir()
    with StatisticsStore(tmp_path) as store:
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted(["svdkit-stats-running", "svdkit-stats-unmarked", store.path.name])
        assert (store.path / OWNER_FILE).is_file()
