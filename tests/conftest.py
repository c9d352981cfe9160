"""Shared fixtures and helpers: tiny random-weight models of the Llama family, a tiny tokenizer, the shared
data; small matrices for the methods' exact math; compressing a tiny model; running the command line; a
local zero-shot task."""

from __future__ import annotations

import json
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
def data_dir(tmp_path):
    """A protocol data folder holding a tiny WikiText-2 test text and a tiny PTB validation text."""
    d = tmp_path / "data"
    (d / "wikitext-2-raw").mkdir(parents=True)
    (d / "ptb").mkdir()
    (d / "wikitext-2-raw" / "wiki.test.raw").write_text(TEXT * 3)
    (d / "ptb" / "ptb.valid.txt").write_text(TEXT.lower() * 2)
    return d


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


# --- small matrices for the methods' exact math (build them under float64_default) -----------------

W = torch.randn(12, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
"""A 12 x 9 weight the methods' tests decompose."""


def stats_of(X: torch.Tensor, **extra):
    """Statistics of inputs X (n x T): Gram matrix and mean |x|, plus any `extra` values."""
    from svdkit.calibration.statistics import LinearStats

    return LinearStats({"gram": X @ X.T, "mean_abs": X.abs().mean(1), **extra}, tokens=X.shape[1])


def gram_stats(X: torch.Tensor):
    """Statistics of inputs X (n x T) holding the Gram matrix only."""
    from svdkit.calibration.statistics import LinearStats

    return LinearStats({"gram": X @ X.T}, tokens=X.shape[1])


def decompose(method: str, W, X, k, **opts):
    """The factors (A, B) of `method` at rank k, with statistics of the inputs X (None: no statistics)."""
    from svdkit.methods import get_method, make_config

    stats = gram_stats(X) if X is not None else None
    m = get_method(method)
    return m.decompose(W, stats, k, make_config(m, opts))


def product(method: str, W, stats, k, **opts) -> torch.Tensor:
    """B A of `method` at rank k, after checking the factors' shapes."""
    from svdkit.methods import get_method, make_config

    m = get_method(method)
    A, B = m.decompose(W, stats, k, make_config(m, opts))
    assert A.shape == (k, W.shape[1]) and B.shape == (W.shape[0], k)
    return B @ A


def truncated(M: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation of M (truncated SVD)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def cost_of(ranks, shapes) -> int:
    """Parameters kept: k (m + n) per low-rank matrix, m n per dense one (rank None)."""
    from svdkit.core.ranks import cost

    return sum(cost(shape, ranks[k]) for k, shape in shapes.items())


# --- compressing a tiny model ---------------------------------------------------------------------


def compressed(kind: str, method: str, ratio: float = 0.4):
    """A tiny model of `kind` compressed by `method` on 4 windows of 64 random tokens: (model, result, dense
    parameter count)."""
    import svdkit

    model = tiny_model(kind)
    dense = svdkit.count_parameters(model)
    calib = random_tokens(4 * 64, seed=1)
    result = svdkit.compress(
        model, method=method, ratio=ratio, calib=calib, calib_samples=4, calib_seqlen=64, device="cpu", progress=False
    )
    return model, result, dense


def compress_small(model, **kw):
    """svdkit.compress on 4 windows of 32 random tokens, on the CPU, without progress bars; `kw` overrides."""
    import svdkit

    calib = random_tokens(4 * 32, seed=1)
    opts = dict(calib=calib, calib_samples=4, calib_seqlen=32, device="cpu", progress=False)
    return svdkit.compress(model, **{**opts, **kw})


# --- the command line -----------------------------------------------------------------------------


def run_cli(capsys, *argv):
    """Run ``svdkit`` with `argv` (made strings) in-process: (exit code, stdout, stderr)."""
    from svdkit.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def assert_error(code, err, fragment):
    """Exit code 2 and one error line, the last, in svdkit's format and holding `fragment`."""
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("svdkit: error: ") and fragment in lines[-1], err
    assert sum("error" in line for line in lines) == 1


# --- a local zero-shot task (multiple choice) for lm-evaluation-harness ----------------------------

TASK = "svdkit_tiny_mc"
DOCS = [
    ("The quick brown fox", ["jumps over", "sleeps", "judges my vow"]),
    ("Pack my box with", ["five dozen liquor jugs", "quartz", "a lazy dog"]),
    ("How vexingly quick", ["daft zebras jump", "the box", "black"]),
    ("Sphinx of black quartz,", ["judge my vow", "pack my box", "jump"]),
    ("The lazy dog", ["sleeps", "jumps over the fox", "is quick"]),
    ("Five dozen", ["liquor jugs", "zebras", "brown foxes jump"]),
    ("Daft zebras", ["jump", "judge the sphinx", "pack boxes"]),
    ("Judge my", ["vow", "quartz sphinx", "lazy brown dog"]),
]
WRONG = {1, 5}
"""documents whose gold answer is the model's worst choice: accuracy 6/8, and 3/4 on the first four"""


@pytest.fixture()
def offline_one_thread(monkeypatch):
    """Nothing may download; one thread runs a tiny model fastest (no OpenMP waits on a busy machine)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def choice_scores(model, tok, context: str, choices: list[str]) -> list[float]:
    """Summed log-likelihood of ' choice' after `context`, tokenized as lm-eval does: the whole text is
    encoded and the continuation is what follows the context's tokens."""
    n_context = len(tok.encode(context))
    scores = []
    for choice in choices:
        ids = torch.tensor(tok.encode(context + " " + choice))
        logp = model(input_ids=ids[None]).logits[0].double().log_softmax(-1)
        scores.append(float(sum(logp[i - 1, ids[i]] for i in range(n_context, len(ids)))))
    return scores


def write_task(folder, model, tok) -> tuple[float, float]:
    """The task YAML and its data; returns the expected (acc, acc_norm) over all documents."""
    folder.mkdir(exist_ok=True)
    rows, norm_hits = [], 0
    for i, (question, choices) in enumerate(DOCS):
        s = choice_scores(model, tok, question, choices)
        ranked = sorted(s, reverse=True)
        assert ranked[0] - ranked[1] > 1e-3, "choices too close to call"
        gold = s.index(min(s) if i in WRONG else max(s))
        norm = [v / len(c) for v, c in zip(s, choices, strict=True)]  # lm-eval's acc_norm: per character
        norm_hits += norm.index(max(norm)) == gold
        rows.append({"question": question, "choices": choices, "label": gold})
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(folder / 'hf-cache'))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return 1 - len(WRONG) / len(DOCS), norm_hits / len(DOCS)


# --- temporary folders left by a killed run ------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def mark_owner(folder, pid: int, **changes) -> None:
    """Write `folder`'s owner file as process `pid` of this machine would (`changes` alter fields)."""
    from svdkit.core.disk import OWNER_FILE, owner

    (folder / OWNER_FILE).write_text(json.dumps({**owner(), "pid": pid, **changes}))
