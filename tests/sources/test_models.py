"""Finding a model: a model that is not a causal decoder is refused from its config, before its weights load
(library and command line); the bundled model's one-time conversion runs under a lock."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from conftest import assert_error, dead_pid, mark_owner, run_cli
from transformers import BertConfig, BertForMaskedLM

import svdkit
from svdkit import SvdkitError
from svdkit.sources import models
from svdkit.sources.models import load_model


@pytest.fixture()
def bert_folder(tmp_path, tiny_tokenizer):
    """A tiny BertForMaskedLM with a tokenizer, saved as a user's model folder."""
    config = BertConfig(
        vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    folder = tmp_path / "tiny-bert"
    BertForMaskedLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_a_masked_lm_folder_is_refused_with_what_it_holds_and_what_is_supported(bert_folder, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(SvdkitError) as e:
        svdkit.load_model(bert_folder)
    message = str(e.value)
    assert "BertForMaskedLM" in message and "not a causal decoder" in message
    assert "AutoModelForCausalLM" in message and "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message


def test_compress_refuses_a_masked_lm_in_one_line_and_writes_nothing(capsys, bert_folder, text_file, tmp_path):
    out = tmp_path / "out"
    argv = ["--calib", text_file, "--calib-samples", "2", "--calib-seqlen", "32", "--device", "cpu"]
    code, _, err = run_cli(capsys, "compress", bert_folder, "--ratio", "0.4", *argv, "--output", out)
    assert_error(code, err, "holds a BertForMaskedLM (bert), not a causal decoder")
    assert not out.exists()


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
        {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]},  # AutoModelForCausalLM's own
        {"model_type": "llama"},  # no architectures: AutoModelForCausalLM decides from the model type
        {"model_type": "llama", "architectures": ["LLaMAForCausalLM"]},  # an old hub name: left to transformers
        {  # ships its own causal-LM class (svdkit's portable folders, remote-code models)
            "model_type": "svdkit_llama",
            "architectures": ["SvdkitLlamaForCausalLM"],
            "auto_map": {"AutoModelForCausalLM": "modeling_svdkit.SvdkitLlamaForCausalLM"},
        },
    ],
)
def test_causal_decoders_pass_the_config_check(config):
    models.require_causal_lm(config, "m")


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}, "(t5)"),
        ({"model_type": "bert", "architectures": ["BertForSequenceClassification"]}, "BertForSequenceClassification"),
        ({"model_type": "roberta", "architectures": ["RobertaModel"]}, "RobertaModel"),
    ],
)
def test_encoders_and_encoder_decoders_are_refused(config, fragment):
    with pytest.raises(SvdkitError, match="not a causal decoder") as e:
        models.require_causal_lm(config, "m")
    assert fragment in str(e.value) and "LlamaForCausalLM" in str(e.value)


def _fake_conversion(calls: list, seconds: float):
    """A stand-in for the GGUF conversion: slow enough to overlap, and writes the two files checked for."""

    def convert(gguf, folder):
        calls.append(folder)
        time.sleep(seconds)
        folder.mkdir()  # as save_pretrained makes it
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"weights")

    return convert


@pytest.fixture()
def fake_bundle(tmp_path, monkeypatch) -> list:
    """The bundled GGUF and its conversion faked (no model is read); returns the conversions' log."""
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "bundled_gguf", lambda: tmp_path / "fake.gguf")
    calls: list = []
    monkeypatch.setattr(models, "convert_gguf", _fake_conversion(calls, 0.5))
    return calls


def test_two_first_runs_at_once_convert_the_bundled_model_once(fake_bundle, tmp_path):
    results, errors = [], []

    def first_run():
        try:
            results.append(models.smollm2_folder(progress=False))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    runs = [threading.Thread(target=first_run) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=30)
    target = tmp_path / "cache" / "smollm2-135m-instruct"
    assert not errors and results == [target, target]
    assert len(fake_bundle) == 1  # the second run waited, then found the finished folder
    assert (target / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in target.parent.iterdir()) == [".smollm2-135m-instruct.lock", target.name]


def test_a_killed_conversion_leaves_nothing_the_next_one_keeps(fake_bundle, tmp_path):
    stale = tmp_path / "cache" / ".tmp-smollm2-dead"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    mark_owner(stale, dead_pid())
    target = models.smollm2_folder(progress=False)
    assert not stale.exists() and (target / "config.json").is_file()


def test_an_unwritable_cache_is_a_clear_error(fake_bundle, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("SVDKIT_CACHE", str(blocker / "cache"))
    with pytest.raises(SvdkitError, match="set SVDKIT_CACHE to a writable folder"):
        models.smollm2_folder(progress=False)
    assert not fake_bundle


def test_a_causal_folder_still_loads(tiny_folder):
    model, tok = svdkit.load_model(tiny_folder)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tok("The quick brown fox")["input_ids"]
    with torch.no_grad():
        assert model(input_ids=torch.arange(8)[None]).logits.shape == (1, 8, 320)


def test_weights_that_do_not_fit_the_config_are_refused_naming_module_and_shapes(tiny_folder):
    config = json.loads((tiny_folder / "config.json").read_text())
    config["intermediate_size"] = 128  # the weights hold 160
    (tiny_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SvdkitError, match=r"mlp.down_proj.weight: shape \(64, 160\) vs \(64, 128\)"):
        load_model(tiny_folder)


def test_a_missing_weight_is_refused_not_initialised_randomly(tiny_folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(tiny_folder / "model.safetensors")
    del weights["model.layers.1.self_attn.o_proj.weight"]
    save_file(weights, tiny_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SvdkitError, match="missing model.layers.1.self_attn.o_proj.weight"):
        load_model(tiny_folder)


@pytest.mark.parametrize("key", ["num_hidden_layers", "hidden_size"])
def test_a_config_without_a_size_is_refused_naming_the_key(capsys, tmp_path, tiny_folder, key):
    from conftest import assert_error, run_cli

    config = json.loads((tiny_folder / "config.json").read_text())
    del config[key]
    (tiny_folder / "config.json").write_text(json.dumps(config))
    for argv in (["compress", tiny_folder, "--output", tmp_path / "out"], ["eval", tiny_folder]):
        code, _, err = run_cli(capsys, *argv)
        assert_error(code, err, f"does not set {key} (transformers would assume {key}=")
    assert not (tmp_path / "out").exists()


def test_a_full_cache_is_refused_before_the_conversion_and_a_disk_filled_meanwhile_names_the_folder(
    fake_bundle, tmp_path, monkeypatch
):
    import collections
    import errno

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda p: usage(10**9, 10**9 - 50 * 2**20, 50 * 2**20))
    with pytest.raises(SvdkitError, match=r"not enough free space in .* for the converted SmolLM2 .*SVDKIT_CACHE"):
        models.smollm2_folder(progress=False)
    assert not fake_bundle
    monkeypatch.undo()
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "bundled_gguf", lambda: tmp_path / "fake.gguf")

    def full(gguf, folder):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(models, "convert_gguf", full)
    with pytest.raises(SvdkitError) as e:
        models.smollm2_folder(progress=False)
    assert "smollm2-135m-instruct (" in str(e.value) and "No space left on device" in str(e.value)
    assert "set SVDKIT_CACHE to a writable folder with 560 MB free" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".smollm2-135m-instruct.lock"]
