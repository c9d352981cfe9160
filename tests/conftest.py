"""Shared fixtures: tiny random-weight models of the Llama family, a tiny tokenizer, the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SVDKIT_TEST_DATA", REPO.parent / "shared" / "data"))
VOCAB = 320


def tiny_config(kind: str = "llama", **overrides):
    """A 2-layer config with GQA (4 heads, 2 KV heads); variants add biases, untie embeddings, or mix
    sliding-window and global attention layers."""
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif kind == "llama-bias":
        cfg = transformers.LlamaConfig(**{**common, "tie_word_embeddings": False}, attention_bias=True, mlp_bias=True)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**{**common, "tie_word_embeddings": False})
    elif kind == "gemma":
        cfg = transformers.GemmaConfig(**common, head_dim=16)
    elif kind == "gemma3":  # a sliding-window layer, then a global one: each gets its own mask and rotary
        cfg = transformers.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
        )
    elif kind == "qwen3":  # per-head q/k norms
        cfg = transformers.Qwen3Config(**common, head_dim=16)
    elif kind == "qwen3-sliding":
        cfg = transformers.Qwen3Config(
            **common, head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=1
        )
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(kind: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32)
    return model.eval()


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    """Token ids with some structure (a repeated random motif plus noise), so activations are correlated."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, VOCAB, (37,), generator=g)
    ids = motif.repeat(n // 37 + 1)[:n].clone()
    noise = torch.rand(n, generator=g) < 0.3
    ids[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=g)
    return ids


TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
) * 40


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained here on a pangram text (offline, vocabulary <= VOCAB)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=VOCAB, min_frequency=1, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


@pytest.fixture()
def tiny_folder(tmp_path, tiny_tokenizer):
    """A saved tiny Llama (GQA, tied embeddings) with its tokenizer, as a user's model folder."""
    model = tiny_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT * 3)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set SVDKIT_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture()
def float64_default():
    """The methods receive W in float64; build the test matrices in float64 too."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def correlated_inputs(n: int, T: int, seed: int = 0) -> torch.Tensor:
    """X (n x T) with strongly unequal, correlated channels, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)[None, :]
    return mix @ torch.randn(n, T, generator=g) + 3.0 * torch.randn(n, 1, generator=g)
