"""`svdkit generate` on a model compressed with --kv-ratio: the same tokens with the latent KV cache."""

from __future__ import annotations

import json

import transformers

from svdkit.cli import main


def test_cli_compress_kv_ratio_and_generate(capsys, tiny_folder, text_file, tmp_path):
    out = tmp_path / "kv"
    code = main(
        ["compress", str(tiny_folder), "--ratio", "0", "--kv-ratio", "0.5", "--calib", str(text_file)]
        + ["--calib-samples", "2", "--calib-seqlen", "32", "--output", str(out)]
    )
    assert code == 0
    assert "svdkit generate" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    stdout, _ = capsys.readouterr()
    assert "50% smaller KV cache" in stdout and json.loads(stdout.strip().splitlines()[-1])["kv_ratio"] == 0.5
    results = {}
    for mode in ("ordinary", "latent"):
        code = main(
            ["generate", str(out), "--prompt", "The quick brown", "--max-new-tokens", "12"]
            + ["--kv-cache", mode, "--json"]
        )
        stdout, _ = capsys.readouterr()
        assert code == 0
        results[mode] = json.loads(stdout.strip().splitlines()[-1])
    assert results["latent"]["tokens"] == results["ordinary"]["tokens"] and len(results["latent"]["tokens"]) == 12
    # 2 layers x float32: 2 x 32 key/value numbers per token and layer, or 16 + 16 latent numbers
    assert results["ordinary"]["kv_bytes_per_token"] == 2 * 4 * 64 and results["latent"]["kv_bytes_per_token"] == 256
    prompt = len(transformers.AutoTokenizer.from_pretrained(out)("The quick brown").input_ids)
    assert results["latent"]["kv_tokens_cached"] == results["ordinary"]["kv_tokens_cached"] == prompt + 12 - 1

    code = main(["compress", str(tiny_folder), "--ratio", "0", "--output", str(tmp_path / "x")])
    assert code == 2 and "compresses nothing" in capsys.readouterr().err
    code = main(["compress", str(tiny_folder), "--kv-ratio", "0.5", "--densify", "--output", str(tmp_path / "y")])
    assert code == 2 and "drop one of them" in capsys.readouterr().err
    code = main(["generate", str(tiny_folder), "--kv-cache", "latent"])
    assert code == 2 and "no k_proj or v_proj" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_generate_refuses_a_cache_that_stayed_empty(capsys, monkeypatch, tiny_folder, text_file, tmp_path):
    """If generation ever bypasses the cache svdkit passes, the text is not printed: one error line, exit 2."""
    out = tmp_path / "kv"
    argv = ["compress", str(tiny_folder), "--ratio", "0", "--kv-ratio", "0.5", "--calib", str(text_file)]
    assert main(argv + ["--calib-samples", "2", "--calib-seqlen", "32", "--output", str(out)]) == 0
    capsys.readouterr()
    monkeypatch.setattr("svdkit.cli.generate.cache_kwargs", lambda model, cache: {})
    code = main(["generate", str(out), "--prompt", "The quick brown", "--kv-cache", "latent", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 2 and "KV cache holds 0 tokens" in err and stdout == ""


def test_generate_refuses_to_pass_the_models_context_before_generating(capsys, tiny_folder):
    """The tiny model's context is 256 positions: a prompt plus --max-new-tokens beyond it is refused up front."""
    code = main(["generate", str(tiny_folder), "--prompt", "The quick brown", "--max-new-tokens", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and "pass the model's context of 256 tokens" in err and "at most 25" in err
    assert main(["generate", str(tiny_folder), "--prompt", "The quick brown", "--max-new-tokens", "4"]) == 0


def test_kv_ratio_on_a_model_the_latent_cache_cannot_serve_says_so(capsys, tmp_path, tiny_tokenizer, text_file):
    from conftest import tiny_model

    folder = tmp_path / "gemma3"  # a sliding-window layer
    tiny_model("gemma3").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    argv = ["compress", folder, "--ratio", "0", "--kv-ratio", "0.5", "--calib", text_file, "--calib-samples", "2"]
    assert main([str(x) for x in [*argv, "--calib-seqlen", "32", "--output", tmp_path / "out"]]) == 0
    out = capsys.readouterr().out
    assert "50% smaller KV cache, but the latent cache cannot serve this model (" in out
    assert "--kv-cache latent" not in out
