"""The scorecard of a model (the benchmark protocol's): what a compressed model is judged by.

- perplexity on three domains: WikiText-2 (the first 16 windows of 2048 of the test split), PTB (the first
  8 of validation) and Python's documentation (the last 8 of ``pydoc_data.topics``);
- **generality** = the geometric mean over those domains of ppl / dense ppl (1 = no loss anywhere);
- zero-shot accuracy on ARC-Easy, PIQA, HellaSwag, WinoGrande and BoolQ as lm-eval scores them
  (:mod:`svdkit.measure.tasks`): acc_norm where lm-eval reports it for the task, else acc; their mean and
  its standard error (tasks independent: sqrt(sum se^2) / 5); the first `limit` documents of each task;
- the generation scores (:mod:`svdkit.measure.generation`): repeated 3-grams and distinct-2 of greedy
  continuations of 16 prompts from WikiText-2's validation slice (tokens [40960, 57344)).

:func:`scorecard` measures one model, :func:`cached_scorecard` the same through a cache keyed by the
weights' fingerprint (every compressed model compares with one measurement of dense); :func:`compare` puts
dense beside a card (ratios, differences, generality); :func:`format_scorecard` prints the table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.fingerprint import model_fingerprint
from ..errors import SvdkitError
from ..sources.models import cache_dir
from ..sources.text import load_text, tokenize
from ..version import __version__
from .generation import generation_quality
from .perplexity import perplexity
from .tasks import LOCAL_TASKS
from .zeroshot import zero_shot

__all__ = [
    "DOMAINS",
    "VALIDATION",
    "ScorecardSettings",
    "domain_tokens",
    "domain_perplexities",
    "task_scores",
    "zero_shot_scores",
    "generality",
    "scorecard",
    "PTB_VALIDATION",
    "compare",
    "cached_scorecard",
    "format_scorecard",
]

DOMAINS = ("wikitext2", "ptb", "pydoc")
"""the scorecard's three text domains: WikiText-2 test, PTB validation, Python's documentation"""

VALIDATION = (40960, 57344)
"""WikiText-2 test tokens of the protocol's validation slice (8 windows of 2048 between evaluation and calibration)"""

PTB_VALIDATION = (16384, 32768)
"""PTB validation tokens of the protocol's validation windows (8 to 15 of 2048; the first 8 are its test)"""

_FILES = {"wikitext2": "wikitext-2-raw/wiki.test.raw", "ptb": "ptb/ptb.valid.txt"}


@dataclass(frozen=True)
class ScorecardSettings:
    """What the scorecard measures; the defaults are the protocol's."""

    seqlen: int = 2048
    windows: Mapping[str, int] = field(default_factory=lambda: {"wikitext2": 16, "ptb": 8, "pydoc": 8})
    """evaluation windows per domain: the first ones of WikiText-2 and PTB, the last ones of the Python docs"""
    tasks: Sequence[str] = tuple(LOCAL_TASKS)
    limit: int | None = 250
    """zero-shot documents per task (the first ones; None: every document)"""
    batch_size: int = 16
    generation: bool = True

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "windows": dict(self.windows), "tasks": list(self.tasks)}


def domain_tokens(tokenizer, data_dir: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The token streams of the three domains: WikiText-2 test and PTB validation from `data_dir` (the
    protocol's data folder; None: ``$SVDKIT_DATA``, else Hugging Face datasets), Python's docs from the
    standard library."""
    texts: dict[str, str] = {}
    for name, rel in _FILES.items():
        if data_dir is None:
            texts[name] = load_text(name)
            continue
        path = Path(data_dir) / rel
        if not path.is_file():
            raise SvdkitError(
                f"the protocol's text is missing: {path}; the data folder must hold {', '.join(_FILES.values())}"
            )
        texts[name] = load_text(path)
    texts["pydoc"] = load_text("demo")
    return {name: tokenize(tokenizer, text) for name, text in texts.items()}


def _window_slice(name: str, ids: torch.Tensor, seqlen: int, n: int) -> torch.Tensor:
    """The evaluated tokens of a domain: its first n windows (the Python docs: its last n)."""
    return ids[-n * seqlen :] if name == "pydoc" else ids[: n * seqlen]


def domain_perplexities(
    model: nn.Module, tokens: Mapping[str, torch.Tensor], settings: ScorecardSettings = ScorecardSettings()
) -> dict[str, float]:
    """Perplexity on each domain's evaluation windows."""
    out = {}
    for name, ids in tokens.items():
        n = settings.windows[name]
        part = _window_slice(name, ids, settings.seqlen, n)
        out[name] = perplexity(model, None, part, seqlen=settings.seqlen, max_windows=n, progress=False).ppl
    return out


def task_scores(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """lm-eval's results as the scorecard keeps them: per task the metric (acc_norm where reported, else
    acc), its value and stderr and the documents scored; the mean over tasks and its standard error."""
    tasks = {}
    for name, m in results.items():
        metric = "acc_norm" if m.get("acc_norm") is not None else "acc"
        tasks[name] = {
            "metric": metric,
            "value": m[metric],
            "stderr": m.get(f"{metric}_stderr"),
            "samples": m.get("samples"),
        }
    values = [t["value"] for t in tasks.values()]
    errors = [t["stderr"] for t in tasks.values()]
    mean = sum(values) / len(values) if values else None
    se = math.sqrt(sum(e * e for e in errors)) / len(errors) if errors and None not in errors else None
    return {"tasks": tasks, "mean": mean, "mean_stderr": se}


def generality(ppl: Mapping[str, float], dense: Mapping[str, float]) -> float:
    """exp(mean over the domains of log(ppl / dense ppl)): the geometric mean of the perplexity ratios."""
    names = [d for d in DOMAINS if d in ppl and d in dense]
    if not names:
        raise SvdkitError("generality needs the perplexity of the same domains for the model and dense")
    return math.exp(sum(math.log(ppl[d] / dense[d]) for d in names) / len(names))


def zero_shot_scores(
    model: nn.Module,
    tokenizer,
    settings: ScorecardSettings = ScorecardSettings(),
    *,
    data_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The scorecard's zero-shot part (:func:`task_scores`): `settings`' tasks on their first `limit` documents."""
    tasks = list(settings.tasks)
    results = zero_shot(
        model,
        tokenizer,
        tasks,
        batch_size=settings.batch_size,
        limit=settings.limit,
        task_data=data_dir,
        progress=progress,
    )
    return task_scores({t: results[t] for t in tasks})


@torch.no_grad()
def scorecard(
    model: nn.Module,
    tokenizer,
    settings: ScorecardSettings = ScorecardSettings(),
    *,
    data_dir: str | os.PathLike | None = None,
    tokens: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The scorecard of `model` as it is in memory (perplexities, zero-shot, generation); `data_dir` is the
    protocol's data folder (texts and ``zeroshot/``; None: ``$SVDKIT_DATA``); `tokens` (from
    :func:`domain_tokens`) skips reading the texts again."""
    tokens = tokens if tokens is not None else domain_tokens(tokenizer, data_dir)
    card: dict[str, Any] = {"settings": settings.record(), "ppl": domain_perplexities(model, tokens, settings)}
    if settings.tasks:
        card["zero_shot"] = zero_shot_scores(model, tokenizer, settings, data_dir=data_dir, progress=progress)
    if settings.generation:
        wiki = tokens["wikitext2"]
        g = generation_quality(model, wiki[VALIDATION[0] : VALIDATION[1]])
        card["generation"] = {"repeated_3grams": g.repeated_3grams, "distinct_2": g.distinct_2}
    return card


def cached_scorecard(
    model: nn.Module,
    tokenizer,
    settings: ScorecardSettings = ScorecardSettings(),
    *,
    data_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """:func:`scorecard`, from svdkit's cache when the same weights were scored with the same settings, data
    and versions (so every compressed model compares with one measurement of dense); written atomically."""
    path = cache_dir() / "scorecards" / f"{_card_key(model, settings, data_dir)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    card = scorecard(model, tokenizer, settings, data_dir=data_dir, progress=progress)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:  # whole or not at all: a reader never sees half a card
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(card) + "\n")
        os.replace(tmp, path)
    except OSError:  # a cache that cannot be written only costs time next run
        tmp.unlink(missing_ok=True)
    return card


def _card_key(model: nn.Module, settings: ScorecardSettings, data_dir) -> str:
    """The weights' fingerprint, the settings, the data files (size, time) and svdkit's and lm-eval's versions."""
    import lm_eval

    files = []
    if data_dir is not None:
        files = sorted(
            (str(p.relative_to(data_dir)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in Path(data_dir).rglob("*")
            if p.is_file()
        )
    parts = [
        model_fingerprint(model),
        json.dumps(settings.record(), sort_keys=True),
        json.dumps(files),
        str(next(model.parameters()).dtype),
        __version__,
        getattr(lm_eval, "__version__", "?"),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def compare(card: Mapping[str, Any], dense: Mapping[str, Any]) -> dict[str, Any]:
    """`card` with dense beside it: ``dense`` (dense's card), ``generality`` and ``zero_shot_drop`` (dense's
    mean accuracy minus the model's, in points)."""
    if card.get("settings") != dense.get("settings"):
        raise SvdkitError("the model's and dense's scorecards were measured with other settings: measure both alike")
    out = {
        **card,
        "dense": {k: v for k, v in dense.items() if k != "dense"},
        "generality": generality(card["ppl"], dense["ppl"]),
    }
    if "zero_shot" in card and "zero_shot" in dense:
        out["zero_shot_drop"] = 100 * (dense["zero_shot"]["mean"] - card["zero_shot"]["mean"])
    return out


def _rows(card: Mapping[str, Any]) -> list[tuple[str, float | None, str]]:
    """(label, value, how to compare with dense): 'x' a ratio, 'pt' a difference in points, '' none."""
    rows: list[tuple[str, float | None, str]] = [(f"perplexity {d}", card["ppl"].get(d), "x") for d in DOMAINS]
    zs = card.get("zero_shot")
    if zs:
        for name, t in zs["tasks"].items():
            rows.append((f"{name} ({t['metric']})", 100 * t["value"], "pt"))
        rows.append(("zero-shot mean", 100 * zs["mean"], "pt"))
    g = card.get("generation")
    if g:
        rows += [("repeated 3-grams", g["repeated_3grams"], "x"), ("distinct-2", g["distinct_2"], "x")]
    return rows


def format_scorecard(card: Mapping[str, Any]) -> str:
    """The scorecard as a table: one row per measure, dense beside it when :func:`compare` added it."""
    dense = card.get("dense")
    dense_rows = {label: v for label, v, _ in _rows(dense)} if dense else {}
    head = f"{'measure':<26} {'model':>10}" + (f" {'dense':>10} {'vs dense':>10}" if dense else "")
    lines = [head]
    for label, value, how in _rows(card):
        line = f"{label:<26} {_num(value):>10}"
        if dense:
            d = dense_rows.get(label)
            versus = "" if d is None or value is None else (f"{value / d:.3f}x" if how == "x" else f"{value - d:+.2f}")
            line += f" {_num(d):>10} {versus:>10}"
        lines.append(line)
    if dense:
        lines.append(f"{'generality':<26} {card['generality']:>10.3f}   (geometric mean of the perplexity ratios)")
    zs = card.get("zero_shot")
    if zs and zs.get("mean_stderr") is not None:
        limit = card["settings"].get("limit")
        docs = f"the first {limit} documents of each task" if limit else "every document"
        lines.append(f"zero-shot: {docs}; the mean's standard error {100 * zs['mean_stderr']:.2f} points")
    return "\n".join(lines)


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"
