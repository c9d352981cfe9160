"""benchmarks/results_grid.py: one table from several runs; generation scores joined to cells measured elsewhere."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "results_grid.py"


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("results_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _file(folder: Path, dense: dict, cells: list[dict], **settings) -> str:
    folder.mkdir(parents=True)
    report = {"model": "m", "seqlen": 2048, "dense": dense, "cells": cells, **settings}
    (folder / "results.json").write_text(json.dumps(report))
    return str(folder / "results.json")


def test_generation_scores_join_the_cells_of_another_file_and_must_agree(tmp_path, grid):
    cell = {"method": "svd-llm", "allocation": "uniform", "ratio": 0.2}
    ppl = _file(tmp_path / "ppl", {"wikitext2": 20.0, "ptb": 40.0}, [{**cell, "wikitext2": 60.0, "ptb": 200.0}])
    gen = _file(
        tmp_path / "gen",
        {"repeated_3grams": 0.4, "distinct_2": 0.5},
        [  # newer files record heal "none" where older ones have no such key: the same row
            {**cell, "heal": "none", "repeated_3grams": 0.7, "distinct_2": 0.2},
            {**cell, "heal": "none", "ratio": 0.4, "repeated_3grams": 0.9},
        ],
        perplexity=False,
    )
    table = grid.main([ppl, gen])
    first, second, _ = table.split("\n\n")
    assert "| svd-llm | uniform |  | 60.00 |  |  | 200.00 |  |  | ppl/results.json |" in first
    assert "| dense | | | 0.400 | | | 0.500 | | | |" in second
    assert "| svd-llm | uniform |  | 0.700 | 0.900 |  | 0.200 |  |  | gen/results.json |" in second
    other = _file(tmp_path / "other", {"repeated_3grams": 0.4}, [{**cell, "repeated_3grams": 0.6}])
    with pytest.raises(SystemExit, match="repeated_3grams disagrees"):
        grid.main([ppl, gen, other])
    protocol = _file(tmp_path / "protocol", {"wikitext2": 21.0}, [])
    with pytest.raises(SystemExit, match="another dense wikitext2"):
        grid.main([ppl, protocol])


def test_healed_cells_are_rows_of_their_healers_non_default_options(tmp_path, grid):
    cell = {"method": "svd-llm", "allocation": "uniform", "ratio": 0.2, "heal": "block,kd", "pydoc": 90.0}
    config = {"block": {"lr": 1e-4, "log": "/tmp/x"}, "kd": {"lr": 1e-4, "seqlen": 1024, "log": None}}
    dense = {"wikitext2": 20.0}
    a = _file(tmp_path / "a", dense, [{**cell, "heal_config": config, "wikitext2": 30.0, "healing_s": 600.0}])
    b = _file(tmp_path / "b", dense, [{**cell, "heal_config": {**config, "kd": {"lr": 3e-5}}, "wikitext2": 31.0}])
    table = grid.main([a, b])  # one cell, two settings: two rows, not a disagreement
    assert "| svd-llm+heal:block,kd (kd.seqlen=1024) | uniform |  | 30.00 |" in table
    assert "| svd-llm+heal:block,kd (kd.lr=3e-05) | uniform |  | 31.00 |" in table
    more = table.split("\n\n")[2]  # the third domain and the healing seconds
    assert "| svd-llm+heal:block,kd (kd.seqlen=1024) | uniform |  | 90.00 |  |  | 600.00 |  |  | a/" in more
    old = _file(tmp_path / "old", dense, [{**cell, "wikitext2": 32.0}])
    with pytest.raises(SystemExit, match="without heal_config"):
        grid.main([old])
