"""The byte budget (allocation ``bytes``) for qlr's corrections: the budget met and spent, rank where the base's
residual is largest, the ranks those of its spectra, recorded; refused below the bases or without a base."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_error, compress_small, last_json, run_cli, tiny_model

from svdkit.allocators.base import AllocationContext
from svdkit.allocators.bytes import BytesAllocationConfig, allocate_bytes, pair_bytes
from svdkit.core.modeling_svdkit import QuantLowRankLinear
from svdkit.errors import SvdkitError
from svdkit.methods import get_method
from svdkit.methods.blockquant import block_bytes
from svdkit.methods.qlr import QLRConfig


def _context(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], step: int = 32):
    config = QLRConfig(block=32)
    return AllocationContext(
        shapes, 0.0, method=get_method("qlr"), method_config=config, summaries=spectra, rank_multiple=step
    )


def _stored(shapes, ranks, config: BytesAllocationConfig) -> int:
    return sum(block_bytes(m, n, 4, 32) + pair_bytes(m, n, ranks[k], config) for k, (m, n) in shapes.items())


def test_the_budget_goes_where_the_residual_is_largest():
    shapes = {"a": (256, 256), "b": (256, 256), "c": (128, 512)}
    decay = torch.linspace(1, 0.01, 128, dtype=torch.float64)
    spectra = {"a": 10 * decay, "b": decay, "c": 3 * decay}
    config = BytesAllocationConfig(bits_per_weight=8.0)
    context = _context(spectra, shapes)
    ranks = allocate_bytes(context, config)
    budget = 8.0 / 8 * sum(m * n for m, n in shapes.values())
    spent = _stored(shapes, ranks, config)
    assert spent <= budget and context.report["bytes"] == spent
    assert all(k % 32 == 0 and 32 <= k <= min(shapes[n]) // 2 for n, k in ranks.items())
    assert ranks["a"] > ranks["c"] > ranks["b"]
    # spent, not thrown away: one more step anywhere would not fit
    assert all(
        spent + pair_bytes(*shapes[k], r + 32, config) - pair_bytes(*shapes[k], r, config) > budget
        for k, r in ranks.items()
        if r < 128
    )
    more = allocate_bytes(_context(spectra, shapes), BytesAllocationConfig(bits_per_weight=9.0))
    assert all(more[k] >= ranks[k] for k in shapes) and sum(more.values()) > sum(ranks.values())


def test_below_the_bases_it_refuses_as_the_plan_is_made():
    shapes = {"a": (64, 64)}
    with pytest.raises(SvdkitError, match="below the bases"):
        allocate_bytes(_context({"a": torch.ones(32)}, shapes, 8), BytesAllocationConfig(bits_per_weight=5.0))
    from svdkit.pipeline.options import CompressionOptions
    from svdkit.pipeline.plan import make_plan

    options = CompressionOptions(method="qlr", allocation="bytes", allocation_options={"bits_per_weight": 4.2})
    with pytest.raises(SvdkitError, match="below the bases"):  # before any calibration pass
        make_plan(tiny_model("llama"), options)


def test_qlr_under_a_byte_budget_in_the_pipeline():
    model = tiny_model("llama")
    result = compress_small(
        model,
        method="qlr",
        allocation="bytes",
        allocation_options={"bits_per_weight": 9.0, "pair_bits": 16},
        rank_multiple=4,
    )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLowRankLinear)}
    assert len(layers) == 14 and len(set(result.ranks.values())) > 1  # ranks differ matrix by matrix
    config = BytesAllocationConfig(bits_per_weight=9.0, pair_bits=16)
    shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
    spent = _stored(shapes, {n: m.rank for n, m in layers.items()}, config)
    assert spent <= 9.0 / 8 * sum(m * n for m, n in shapes.values())
    record = model.config.svdkit["allocation"]
    assert record["name"] == "bytes" and record["bytes"] == spent and record["bits_per_weight"] <= 9.0
    assert result.ranks == {n: m.rank for n, m in layers.items()}


def test_refusals(capsys, tmp_path, tiny_folder, text_file):
    with pytest.raises(SvdkitError, match="does not have: use it with method qlr"):
        compress_small(tiny_model("llama"), method="svd-llm", allocation="bytes")
    calib = ["--calib", text_file, "--calib-samples", "3", "--calib-seqlen", "32"]
    budget = ["--allocation", "bytes", "--allocation-option", "bits_per_weight=4.2"]
    code, _, err = run_cli(
        capsys, "compress", tiny_folder, "--method", "qlr", *budget, *calib, "--output", tmp_path / "x"
    )
    assert_error(code, err, "below the bases")
    assert not (tmp_path / "x").exists()
    budget[-1] = "bits_per_weight=12"
    code, stdout, err = run_cli(
        capsys, "compress", tiny_folder, "--method", "qlr", *budget, *calib, "--output", tmp_path / "y"
    )
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "info", tmp_path / "y", "--json")
    allocation = last_json(stdout)["allocation"]
    assert code == 0 and allocation["name"] == "bytes" and allocation["bits_per_weight"] <= 12
    assert "bits per weight (budget 12" in stdout and f"{allocation['bytes']:,} bytes" in stdout
