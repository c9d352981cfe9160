"""Every option is checked up front by the one validator set: for every field of every registered method's
and allocator's config, of CompressionOptions and of CalibrationSettings, a value of the wrong type and
(where the field has a range) a value out of range raise SvdkitError naming the field, before any model
work; on the command line (--option, --allocation-option) they exit 2 with one line and write nothing.

The tables below name every field: a new field fails test_every_field_is_in_the_tables until its wrong
values are listed here (None where no value of the right type is out of range)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import assert_error, random_tokens, run_cli, tiny_model

import svdkit
from svdkit.allocators import ALLOCATORS, make_allocation_config
from svdkit.methods import METHODS, make_config
from svdkit.pipeline.options import CalibrationSettings, CompressionOptions

MISSING_FOLDER = "/nonexistent-folder/file.json"

OUT_OF_RANGE = {
    ("method", "svd-llm", "rel_eps"): [-1, 2],
    ("method", "asvd", "alpha"): [-0.1, 2.5],
    ("method", "nsvd", "k1_fraction"): [0, 1.5],
    ("method", "nsvd", "rel_eps"): [-1, 2],
    ("method", "nsvd2", "k1_fraction"): [0, 1.5],
    ("method", "nsvd2", "rel_floor"): [-1, 2],
    ("method", "svd-llm-v2", "rel_floor"): [-1, 1],
    ("method", "qlr", "bits"): [3, 16],
    ("method", "qlr", "block"): [8, 48],
    ("method", "qlr", "rank"): [0],
    ("method", "qlr", "quantizer"): ["awq"],
    ("method", "qlr", "iterations"): [0],
    ("method", "qlr", "damp"): [-1, 2],
    ("method", "qlr", "rel_eps"): [-1, 2],
    ("method", "soco", "base"): ["soco", "nope", "asvd", "qlr"],
    ("method", "soco", "start_ratio"): [-0.1, 1],
    ("method", "soco", "steps"): [-1],
    ("method", "soco", "epochs"): [0, -1],
    ("method", "soco", "max_steps"): [0],
    ("method", "soco", "held_out"): [0, 1],
    ("method", "soco", "guard"): None,
    ("method", "soco", "eval_windows"): [0],
    ("method", "soco", "every"): [0],
    ("method", "soco", "coarse"): [-0.1, 1.5],
    ("method", "soco", "refine"): [-0.1, 1.5],
    ("method", "soco", "penalty_lr"): [0, -1],
    ("method", "soco", "lr"): [0, -1],
    ("method", "soco", "anneal"): None,
    ("method", "soco", "seqlen"): [1],
    ("method", "soco", "batch"): [0],
    ("method", "soco", "seed"): None,
    ("method", "soco", "loss"): ["mse"],
    ("method", "soco", "log"): [MISSING_FOLDER],
    ("allocation", "sensitivity", "windows"): [0],
    ("allocation", "sensitivity", "seqlen"): [1],
    ("allocation", "sensitivity", "grid"): [[], [0], [1], [0.5, 1.5]],
    ("allocation", "sensitivity", "cache"): None,
    ("allocation", "v2", "strength"): [-11, 11],
    ("allocation", "v2", "min_ratio"): [-0.1, 1],
    ("allocation", "v2", "max_ratio"): [-0.1, 1],
    ("allocation", "v2", "rel_floor"): [-1, 1],
    ("allocation", "v2", "rule"): ["linear"],
    ("allocation", "v2", "loss"): ["squared"],
    ("allocation", "bytes", "bits_per_weight"): [0, 33],
    ("allocation", "bytes", "pair_bits"): [3, 2],
    ("allocation", "bytes", "pair_block"): [8, 48],
    ("allocation", "bytes", "max_rank"): [0],
}
"""(kind, name, field) -> values of the right type that are out of range (None: the field has no range)"""

WRONG_TYPE = {
    float: ["abc", True, None, [0.5]],
    int: ["abc", 1.5, True, None],
    bool: ["yes", 1, None],
    str: [5, True, None, ["ce"]],
    tuple: ["abc", True, None],
    type(None): [5, True, ""],  # file paths, None by default
}
"""a field's default type -> values of the wrong type (parse_assignment reads '1' as 1 and 'abc' as 'abc')"""


def _registered():
    for kind, registry in (("method", METHODS), ("allocation", ALLOCATORS)):
        for name in registry.names():
            for f in dataclasses.fields(registry.get(name).config_cls):
                yield kind, name, f


def _make(kind: str, name: str, options: dict):
    if kind == "method":
        return make_config(METHODS.get(name), options)
    return make_allocation_config(ALLOCATORS.get(name), options)


def _wrong_values(kind: str, name: str, f: dataclasses.Field) -> list:
    return WRONG_TYPE[type(f.default)] + (OUT_OF_RANGE[kind, name, f.name] or [])


CASES = [(kind, name, f) for kind, name, f in _registered()]
IDS = [f"{name}-{f.name}" for _, name, f in CASES]


def test_every_field_is_in_the_tables():
    assert {(kind, name, f.name) for kind, name, f in CASES} == set(OUT_OF_RANGE)
    assert all(type(f.default) in WRONG_TYPE for _, _, f in CASES)


@pytest.mark.parametrize("kind, name, f", CASES, ids=IDS)
def test_wrong_type_and_out_of_range_values_are_refused(kind, name, f):
    _make(kind, name, {f.name: f.default})  # the default passes
    for value in _wrong_values(kind, name, f):
        with pytest.raises(svdkit.SvdkitError, match=f"^{kind} '{name}': .*{f.name}") as e:
            _make(kind, name, {f.name: value})
        assert type(e.value) is svdkit.SvdkitError, value


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny model folder: an option a check missed would go on to load it and compress."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("model")
    tiny_model().save_pretrained(folder)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["a tiny text for a tiny tokenizer"] * 10, vocab_size=300, show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, name, f", CASES, ids=IDS)
def test_the_command_line_exits_2_with_one_line_and_writes_nothing(capsys, tmp_path, model_folder, kind, name, f):
    out = tmp_path / "out"
    choose = ["--method", name] if kind == "method" else ["--allocation", name]
    flag = "--option" if kind == "method" else "--allocation-option"
    for value in _wrong_values(kind, name, f):
        given = value if isinstance(value, str) else json.dumps(value)
        argv = ["compress", model_folder, *choose, flag, f"{f.name}={given}", "--calib-seqlen", "32"]
        code, _, err = run_cli(capsys, *argv, "--device", "cpu", "--output", out)
        assert_error(code, err, f.name)
        assert not out.exists(), value


# CompressionOptions and CalibrationSettings: made directly (svdkit.compress, the CLI, the benchmark grid)

PIPELINE = {
    "method": [5, None, ["svd"], "", "nope"],
    "ratio": ["abc", True, None, 0, 1, -0.1],
    "method_options": ["rel_eps=1", [("rel_eps", 1)], 5],
    "allocation": [5, None, "", "nope"],
    "allocation_options": ["windows=2", 5],
    "update": [5, None, "ridge"],
    "sequential": ["yes", 1, None],
    "kv_ratio": ["abc", True, 0, 1],
    "heal": [5, "nope", "kd,kd"],
    "heal_options": [5, {"kd.lr": 1e-4}, {"lr": 1}],
    "heal_calib": [5, "", "nosuch-text", "demo:0", "demo,ptb:2", "self[0:9]", torch.rand(10), "demo"],  # no --heal
    "rank_multiple": ["8", 8.0, True, None, 0],
    "targets": ["q_proj", [], [1], ["q_proj", ""]],
    "statistics_dir": [5, ""],
    "device": [5, 1.5, "gpu"],
    "progress": ["no", 0, None],
    "calibration": [{"samples": 4}, None],
}
CALIBRATION = {
    "source": [5, None, "", "/nonexistent/text.txt", torch.rand(10), "demo,", "demo:0", "demo,ptb:2", "self[:2]"],
    "samples": ["4", 1.5, True, 0, 40],  # 40: the spec's counts give 64
    "seqlen": ["64", 64.0, True, None, 1],
    "offset": ["0", 0.5, True, -1],
    "seed": ["x", 0.5, True, None],
}


def test_the_pipeline_tables_name_every_field():
    assert set(PIPELINE) == {f.name for f in dataclasses.fields(CompressionOptions) if f.init}
    assert set(CALIBRATION) == {f.name for f in dataclasses.fields(CalibrationSettings)}


@pytest.mark.parametrize("field", list(PIPELINE))
def test_compression_options_refuse_wrong_values(field):
    for value in PIPELINE[field]:
        with pytest.raises(svdkit.SvdkitError, match=field) as e:
            CompressionOptions(**{field: value})
        assert type(e.value) is svdkit.SvdkitError, value


@pytest.mark.parametrize("field", list(CALIBRATION))
def test_calibration_settings_refuse_wrong_values(field):
    good = {"source": random_tokens(64) if field != "samples" else "demo:32,ptb:32"}
    for value in CALIBRATION[field]:
        with pytest.raises(svdkit.SvdkitError, match="^calibration: ") as e:
            CalibrationSettings(**{**good, field: value})
        assert type(e.value) is svdkit.SvdkitError, value


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"method_options": {"rel_eps": "abc"}}, "method 'svd-llm': rel_eps must be a number in [0, 1], got 'abc'"),
        ({"method_options": {"rel_eps": -1}}, "method 'svd-llm': rel_eps must be a number in [0, 1], got -1"),
        ({"calib_samples": "4"}, "calibration: samples must be a positive integer, got '4'"),
        ({"calib_seqlen": 2.5}, "calibration: seqlen must be an integer >= 2, got 2.5"),
        ({"seed": "x"}, "calibration: seed must be an integer, got 'x'"),
        ({"sequential": "yes"}, "sequential must be true or false, got 'yes'"),
        ({"targets": "q_proj"}, "targets must be a non-empty list of names"),
    ],
)
def test_compress_refuses_before_it_looks_at_the_model(kw, fragment):
    """svdkit.compress checks every option before it touches the model (here: not a model at all)."""
    with pytest.raises(svdkit.SvdkitError) as e:
        svdkit.compress(None, method="svd-llm", calib=random_tokens(600), **kw)
    assert str(e.value) == fragment or str(e.value).startswith(fragment)
