"""A folder whose record and weights disagree, or whose files are damaged, is refused with one line naming
what is wrong, by load, eval, info and densify alike, and without svdkit too (svdkit/saved/contents.py)."""

from __future__ import annotations

import json

import pytest
from conftest import assert_error, compress_small, run_cli, tiny_model
from test_portable import without_svdkit

import svdkit
from svdkit.saved.contents import dense_bytes, record_problems

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture()
def folder(tmp_path, tiny_tokenizer):
    model = tiny_model()
    compress_small(model, method="svd-llm", ratio=0.4)
    svdkit.save(model, tiny_tokenizer, tmp_path / "out")
    return tmp_path / "out"


def edit_record(folder, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config["svdkit"])
    (folder / "config.json").write_text(json.dumps(config))


def refused_everywhere(capsys, tmp_path, folder, fragment: str) -> None:
    """svdkit.load, eval, info and densify each end with one error line holding `fragment`, writing nothing."""
    with pytest.raises(svdkit.SvdkitError, match=fragment):
        svdkit.load(folder)
    for argv in (("eval", folder, "--dataset", "demo"), ("info", folder), ("densify", folder, "--output", "x")):
        code, _, err = run_cli(capsys, *argv[:-1], tmp_path / argv[-1] if argv[0] == "densify" else argv[-1])
        assert_error(code, err, fragment)
    assert not (tmp_path / "x").exists()


def test_empty_ranks_are_refused_not_loaded_as_random_dense_layers(capsys, tmp_path, folder):
    edit_record(folder, lambda r: r.update(ranks={}))
    refused_everywhere(capsys, tmp_path, folder, "mlp.down_proj has factors in the weights but no rank in the record")


def test_a_deleted_rank_is_refused_naming_the_module(capsys, tmp_path, folder):
    edit_record(folder, lambda r: r["ranks"].pop(Q0))
    refused_everywhere(capsys, tmp_path, folder, f"{Q0} has factors in the weights but no rank in the record")


def test_a_rank_that_does_not_match_the_factors_names_module_and_shapes(capsys, tmp_path, folder):
    edit_record(folder, lambda r: r["ranks"].update({Q0: r["ranks"][Q0] + 1}))
    refused_everywhere(capsys, tmp_path, folder, f"{Q0} has rank")
    with pytest.raises(svdkit.SvdkitError, match=r"factors A \[\d+, 64\] and B \[64, \d+\]"):
        svdkit.load(folder)


def test_a_recorded_module_without_factors_is_refused(capsys, tmp_path, folder):
    edit_record(folder, lambda r: r["ranks"].update({"model.layers.1.self_attn.q_proj.extra": 4}))
    refused_everywhere(capsys, tmp_path, folder, "no factors model.layers.1.self_attn.q_proj.extra.A")


@pytest.mark.parametrize(
    ("ranks", "fragment"),
    [([1, 2], "must map module names to ranks, got list"), ({Q0: "8"}, "the rank '8', not a positive integer")],
)
def test_a_malformed_record_is_one_clear_line(capsys, tmp_path, folder, ranks, fragment):
    edit_record(folder, lambda r: r.update(ranks=ranks))
    refused_everywhere(capsys, tmp_path, folder, fragment)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_safetensors_file_is_one_clear_line(capsys, tmp_path, folder, damage):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file" * 4)
    refused_everywhere(capsys, tmp_path, folder, "is not a readable safetensors file")


def test_without_svdkit_an_inconsistent_folder_is_refused_too(tmp_path, folder):
    edit_record(folder, lambda r: r["ranks"].pop(Q0))
    got = without_svdkit(tmp_path, folder)[str(folder)]
    assert "do not match the svdkit record" in got["error"] and f"unexpected {Q0}.A" in got["error"]


def test_weight_bytes_from_the_headers(tmp_path, tiny_tokenizer):
    model = tiny_model()
    dense = 4 * svdkit.count_parameters(model)
    model.save_pretrained(tmp_path / "dense")
    assert dense_bytes(tmp_path / "dense") == dense
    model.half().save_pretrained(tmp_path / "half")  # svdkit loads and writes float32
    assert dense_bytes(tmp_path / "half") == dense
    low = tiny_model()
    compress_small(low, ratio=0.4)
    svdkit.save(low, tiny_tokenizer, tmp_path / "low")
    assert dense_bytes(tmp_path / "low") == dense  # a low-rank pair counts as its dense matrix
    assert dense_bytes(tmp_path / "nothing") is None
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(svdkit.SvdkitError, match="not a readable safetensors file"):
        dense_bytes(tmp_path / "broken")


def test_a_record_naming_a_module_the_model_lacks_is_one_clear_line(capsys, folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    for leaf in ("A", "B"):
        weights[f"model.layers.7.self_attn.q_proj.{leaf}"] = weights.pop(f"{Q0}.{leaf}")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    edit_record(folder, lambda r: r["ranks"].update({"model.layers.7.self_attn.q_proj": r["ranks"].pop(Q0)}))
    code, _, err = run_cli(capsys, "generate", folder, "--max-new-tokens", "1")
    assert_error(code, err, "names the module model.layers.7.self_attn.q_proj, which this model does not have")


def test_parameters_merely_named_a_and_b_are_not_factors():
    shapes = {"model.layers.0.self_attn.A": [4], "model.layers.0.self_attn.q_proj.weight": [8, 8]}  # Doge's A
    assert record_problems({}, shapes) == []
    shapes |= {"m.A": [2, 8], "m.B": [8, 2]}
    assert record_problems({}, shapes) == ["m has factors in the weights but no rank in the record"]


def test_only_the_model_files_count_not_other_safetensors_beside_them(folder):
    size = dense_bytes(folder)
    (folder / "consolidated.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (folder / "adapter_model.safetensors").write_bytes(b"anything")
    assert dense_bytes(folder) == size
    svdkit.load(folder)


def test_a_folder_of_a_model_type_this_transformers_lacks_says_to_upgrade(capsys, folder):
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "svdkit_llama9"
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "eval", folder, "--dataset", "demo")
    assert_error(code, err, "was compressed from a 'llama9' model, which transformers")
    assert "Do you wish to run the custom code" not in capsys.readouterr().out
