"""``svdkit eval``: perplexity of a model on a text, zero-shot accuracy on lm-eval tasks (``--tasks``), or the
protocol's whole scorecard (``--scorecard``: three domains, five zero-shot tasks, generation, dense beside)."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from ..core.device import resolve_device
from ..core.lowrank import count_parameters
from ..deploy.runtime import place
from ..errors import SvdkitError
from ..measure.generation import generation_quality
from ..measure.perplexity import perplexity
from ..measure.scorecard import ScorecardSettings, cached_scorecard, compare, format_scorecard
from ..measure.tasks import LOCAL_TASKS
from ..measure.zeroshot import format_results, local_task_dirs, require_lm_eval, zero_shot
from ..pipeline.options import CompressionOptions
from ..sources.models import load_model
from ..sources.text import SOURCES, source_tokens
from .common import add_dtype, add_fields, emit, nonnegative, positive

__all__ = ["add_parser", "run"]

GENERATION_SPAN = 16384
"""tokens after --offset the generation prompts are spread over (the protocol's validation slice's length)"""


def add_parser(sub) -> None:
    sources = f"a text file or one of {', '.join(SOURCES)}"
    e = sub.add_parser("eval", help="perplexity of a model on a text, or zero-shot accuracy on tasks (--tasks)")
    e.add_argument("model", help="model folder (compressed or not), hub id, .gguf file, or 'smollm2-135m'")
    e.add_argument("--dataset", default="wikitext2", help=f"{sources} (default wikitext2)")
    e.add_argument("--seqlen", type=positive, default=2048, help="tokens per window (2048)")
    e.add_argument("--max-windows", type=positive, default=None, help="evaluate at most N windows")
    e.add_argument("--offset", type=nonnegative, default=0, help="skip this many tokens first (0)")
    add_fields(e, CompressionOptions, {"device": {}})
    add_dtype(e)
    e.add_argument(
        "--tasks",
        metavar="TASK[,TASK...]",
        help="instead of perplexity, zero-shot accuracy on these lm-evaluation-harness tasks, e.g. "
        "arc_easy,hellaswag (needs: pip install 'svdkit[zeroshot]')",
    )
    e.add_argument(
        "--limit", type=positive, default=None, help="at most N documents per task (--tasks; --scorecard: 250)"
    )
    e.add_argument(
        "--batch-size", type=positive, default=None, help="documents per batch (--tasks: 1; --scorecard: 16)"
    )
    e.add_argument(
        "--task-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="with --tasks: a folder of lm-eval task YAML files whose tasks can be named (repeatable)",
    )
    e.add_argument(
        "--data-dir",
        "--task-data",
        dest="data_dir",
        metavar="DIR",
        help="with --tasks or --scorecard: the protocol's data folder (wikitext-2-raw/, ptb/ and zeroshot/ with "
        "arc_easy/, piqa/, hellaswag/, winogrande/, boolq/), read offline; the zero-shot files go through "
        "lm-eval's own task definitions (default: $SVDKIT_DATA, else lm-eval and datasets fetch the data)",
    )
    e.add_argument(
        "--scorecard",
        action="store_true",
        help="the protocol's scorecard: perplexity on WikiText-2, PTB and Python docs, zero-shot accuracy on "
        f"{', '.join(LOCAL_TASKS)} (--limit documents each, default {ScorecardSettings.limit}), generation "
        "scores; with --dense, dense beside each and generality (geometric mean of the perplexity ratios)",
    )
    e.add_argument(
        "--dense",
        metavar="MODEL",
        help="with --scorecard: the uncompressed model to compare with (its scorecard is cached, keyed by its weights)",
    )
    e.add_argument("--num-fewshot", type=nonnegative, default=None, help="with --tasks: examples per prompt (0)")
    e.add_argument(
        "--generation",
        action="store_true",
        help="also greedy continuations of 64 tokens from 16 prompts of 64 evenly spaced in the text after --offset "
        "(the next 16,384 tokens): the share of repeated 3-grams and distinct-2",
    )
    e.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    e.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    if a.scorecard:
        return _scorecard(a)
    if a.dense:
        raise SvdkitError("--dense: only with --scorecard")
    if a.tasks is not None:
        return _zero_shot(a)
    only_with_tasks = {"--limit": a.limit, "--batch-size": a.batch_size, "--num-fewshot": a.num_fewshot}
    given = [flag for flag, value in only_with_tasks.items() if value is not None]
    given += ["--task-dir"] if a.task_dir else []
    given += ["--data-dir"] if a.data_dir else []
    if given:
        raise SvdkitError(f"{', '.join(given)}: only for zero-shot evaluation, which needs --tasks TASK[,TASK...]")
    resolve_device(a.device)  # a bad device fails before the model loads
    model, tok = load_model(a.model, dtype=a.dtype)
    dev = place(model, a.device)
    r = perplexity(model, tok, a.dataset, seqlen=a.seqlen, max_windows=a.max_windows, offset=a.offset)
    print(
        f"perplexity {r.ppl:.4f} on {a.dataset}: {r.windows} windows of {a.seqlen}, {r.tokens} predicted "
        f"tokens, {r.params:,} parameters"
    )
    summary = {"ppl": r.ppl, "windows": r.windows, "tokens": r.tokens, "params": r.params}
    if a.generation:
        ids = source_tokens(tok, a.dataset)[a.offset : a.offset + GENERATION_SPAN]
        g = generation_quality(model, ids, device=dev)
        print(
            f"generation: {g.repeated_3grams:.3f} of 3-grams repeated, distinct-2 {g.distinct_2:.3f} "
            f"({g.prompts} greedy continuations of {g.new_tokens} tokens)"
        )
        summary["generation"] = g.to_dict()
    emit(summary, a.json)


def _zero_shot(a: argparse.Namespace) -> None:
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not tasks:
        raise SvdkitError("--tasks needs at least one task name, e.g. --tasks arc_easy,hellaswag")
    for folder in a.task_dir:
        if not Path(folder).is_dir():
            raise SvdkitError(f"--task-dir '{folder}' is not a folder: give a folder of lm-eval task YAML files")
    require_lm_eval()  # before loading the model
    local_task_dirs(tasks, a.data_dir, a.num_fewshot or 0)  # bad task data fails before the model loads
    dev = resolve_device(a.device)
    model, tok = load_model(a.model, dtype=a.dtype)
    model.to(dev)
    shots = a.num_fewshot or 0
    results = zero_shot(
        model,
        tok,
        tasks,
        batch_size=a.batch_size or 1,
        limit=a.limit,
        task_dirs=a.task_dir,
        num_fewshot=shots,
        task_data=a.data_dir,
    )
    params = count_parameters(model)
    limited = f", at most {a.limit} documents per task" if a.limit else ""
    print(f"{shots}-shot accuracy of {a.model} ({params:,} parameters){limited}")
    print(format_results(results))
    emit({"tasks": results, "num_fewshot": shots, "limit": a.limit, "params": params}, a.json)


def _scorecard(a: argparse.Namespace) -> None:
    given = {"--tasks": a.tasks, "--num-fewshot": a.num_fewshot, "--max-windows": a.max_windows}
    given = [flag for flag, value in given.items() if value is not None] + (["--generation"] if a.generation else [])
    if given:
        raise SvdkitError(f"{', '.join(given)}: not with --scorecard, which measures the protocol's fixed set")
    require_lm_eval()
    settings = ScorecardSettings(
        seqlen=a.seqlen, limit=a.limit or ScorecardSettings.limit, batch_size=a.batch_size or 16
    )
    local_task_dirs(list(settings.tasks), a.data_dir, 0)  # the task data is checked before any model loads
    resolve_device(a.device)
    dense = _card(a.dense, a, settings) if a.dense else None
    card = _card(a.model, a, settings)
    if dense is not None:
        card = compare(card, dense)
    print(f"scorecard of {a.model} ({card['params']:,} parameters)" + (f" beside {a.dense}" if a.dense else ""))
    print(format_scorecard(card))
    emit(card, a.json)


def _card(name: str, a: argparse.Namespace, settings: ScorecardSettings) -> dict:
    """The scorecard of one model (from the cache when its weights were scored alike), with its parameters."""
    model, tok = load_model(name, dtype=a.dtype)
    if not isinstance(model, nn.Module):
        raise SvdkitError(f"--scorecard scores a PyTorch model, and '{name}' is an ONNX export: score its source")
    place(model, a.device)
    card = cached_scorecard(model, tok, settings, data_dir=a.data_dir, progress=True)
    return {**card, "params": count_parameters(model)}
