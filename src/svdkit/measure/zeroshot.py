"""Zero-shot accuracy through lm-evaluation-harness (optional: ``pip install 'svdkit[zeroshot]'``).

:func:`zero_shot` hands the model object itself to lm-eval (``HFLM(pretrained=model)``), so a
low-rank model from :func:`svdkit.compress` or :func:`svdkit.load` is evaluated as it is in memory,
never reloaded from a folder or the hub. Tasks are lm-eval's own (``arc_easy``, ``hellaswag``, ...,
whose data lm-eval fetches with ``datasets``) or YAML task files in extra folders (``task_dirs``). The
protocol's five tasks (arc_easy, piqa, hellaswag, winogrande, boolq) are read offline from local files when
`task_data` or ``$SVDKIT_DATA`` points at them (:mod:`svdkit.measure.tasks`: lm-eval's own task
definitions, local data).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.device import resolve_device
from ..core.options import integer
from ..errors import SvdkitError
from ..sources.models import cache_dir
from .tasks import LOCAL_TASKS, task_data_dir, write_local_tasks

__all__ = ["zero_shot", "local_task_dirs", "format_results", "require_lm_eval", "INSTALL_HINT"]

INSTALL_HINT = "zero-shot evaluation needs lm-evaluation-harness: pip install 'svdkit[zeroshot]'"


def require_lm_eval() -> None:
    """Raise SvdkitError (with the install command) unless lm-evaluation-harness can be imported."""
    _import_lm_eval()


def _import_lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise SvdkitError(INSTALL_HINT) from e
    try:
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except Exception as e:  # an lm-eval older than this transformers (0.4.9 and before with transformers 5)
        version = getattr(lm_eval, "__version__", "?")
        raise SvdkitError(
            f"lm-evaluation-harness {version} is installed but does not work here ({type(e).__name__}: {e}): "
            "upgrade it: pip install -U 'svdkit[zeroshot]'"
        ) from e
    return simple_evaluate, HFLM, TaskManager


def _task_manager(TaskManager, tasks: list[str], dirs: list[str]):
    """lm-eval's task index over `dirs` and its built-in tasks; the built-in index (~15k YAML files,
    seconds to scan) is skipped when every task is a plain task or tag defined in `dirs`."""
    if dirs and "include_defaults" in inspect.signature(TaskManager).parameters:
        local = TaskManager(include_path=dirs, include_defaults=False)
        groups = set(getattr(local, "all_groups", ()))  # a group may name built-in tasks
        if all(t in local.all_tasks and t not in groups for t in tasks):
            return local
    return TaskManager(include_path=dirs or None)


def _check_tasks(manager, tasks: list[str], dirs: list[str]) -> None:
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not (t.endswith((".yaml", ".yml")) and Path(t).is_file())]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3)
        hints.append(f"'{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = f" nor defined in {', '.join(dirs)}" if dirs else ""
    raise SvdkitError(
        f"unknown zero-shot task {', '.join(hints)}: neither an lm-eval task, group or tag{where}; "
        "'lm-eval ls tasks' lists lm-eval's tasks, and task_dirs (--task-dir) adds a folder of task YAML files"
    )


@contextlib.contextmanager
def _harness(progress: bool) -> Iterator[None]:
    """lm-eval without its side work: its log chatter is silenced; the environment report it adds to
    results that are discarded here (torch's collect_env: seconds) and its ``git describe`` of the working
    folder are skipped; unless `progress`, its progress bars and those of ``datasets`` are off. All is
    restored afterwards."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    patched: list[tuple[Any, str, Any]] = []

    def patch(module: str, name: str, make) -> None:
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(module)
            original = getattr(mod, name, None)
            if original is not None:
                setattr(mod, name, make(original))
                patched.append((mod, name, original))

    datasets_bars = False
    try:
        patch("lm_eval.evaluator", "add_env_info", lambda f: lambda *args, **kwargs: None)
        patch("lm_eval.evaluator", "get_git_commit_hash", lambda f: lambda *args, **kwargs: None)
        if not progress:
            for module in ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface"):
                patch(module, "tqdm", _silent)
            with contextlib.suppress(ImportError, AttributeError):
                import datasets

                datasets_bars = not datasets.are_progress_bars_disabled()
                datasets.disable_progress_bars()
        yield
    finally:
        logger.setLevel(level)
        for mod, name, original in reversed(patched):
            setattr(mod, name, original)
        if datasets_bars:
            import datasets

            datasets.enable_progress_bars()


def _silent(bar):
    def make(*args, **kwargs):
        return bar(*args, **{**kwargs, "disable": True})

    return make


def _number(value: Any) -> float | None:
    if isinstance(value, (str, bool)):  # "N/A": no stderr
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _flatten(entry: dict[str, Any]) -> dict[str, float | int | None]:
    """lm-eval's ``{"acc,none": 0.7, "acc_stderr,none": 0.1, "alias": ...}`` as ``{"acc": 0.7, "acc_stderr": 0.1}``;
    a metric under a filter other than ``none`` keeps it (``exact_match,strict-match``)."""
    out: dict[str, float | int | None] = {}
    for key, value in entry.items():
        metric, sep, filt = key.partition(",")
        if not sep or metric == "alias":
            continue
        out[metric if filt == "none" else key] = _number(value)
    return out


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    *,
    batch_size: int = 1,
    limit: int | None = None,
    device: str | torch.device | None = None,
    task_dirs: Sequence[str | os.PathLike] = (),
    num_fewshot: int = 0,
    task_data: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float | int | None]]:
    """Zero-shot (or `num_fewshot`-shot) metrics of `model` on lm-eval `tasks`, per task name.

    Returns e.g. ``{"arc_easy": {"acc": 0.71, "acc_stderr": 0.009, "acc_norm": 0.66, "acc_norm_stderr":
    0.01, "samples": 2376}}``: lm-eval's metrics of each task (and of each group asked for), with
    ``samples`` the number of documents scored (``limit`` caps it per task); a stderr lm-eval does not
    give is None. `tokenizer` is the model's (a transformers tokenizer); `device`, if given, moves the
    model there first, otherwise it runs where it is. `task_dirs` are folders of lm-eval task YAML files
    (their tasks join the built-in ones). `num_fewshot` replaces each task's default number of examples
    in the prompt (lm-eval keeps 0 where a task's YAML fixes 0). The data of built-in tasks is fetched by
    ``datasets`` (or read from its cache), except the protocol's five tasks when `task_data` (else
    ``$SVDKIT_DATA``) holds their files: those are read from there (:func:`~svdkit.measure.tasks.task_data_dir`).
    """
    simple_evaluate, HFLM, TaskManager = _import_lm_eval()
    tasks, dirs = _checked(tasks, tokenizer, batch_size, limit, num_fewshot, task_dirs)
    dirs = local_task_dirs(tasks, task_data, num_fewshot) + dirs
    if device is not None:
        model.to(resolve_device(device))
    was_training = model.training
    with _harness(progress):
        manager = _task_manager(TaskManager, tasks, dirs)
        _check_tasks(manager, tasks, dirs)
        try:
            # the model object itself: HFLM takes its device and config and loads nothing
            lm = HFLM(pretrained=model, tokenizer=_copy(tokenizer), batch_size=batch_size)
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=False,
            )
        except ConnectionError as e:
            raise SvdkitError(
                f"the data of zero-shot task(s) {', '.join(tasks)} could not be fetched ({e}): connect to the "
                "network once, or point HF_HOME at a cache that holds it"
            ) from e
        finally:
            model.train(was_training)
    return _results(out)


def _checked(tasks, tokenizer, batch_size, limit, num_fewshot, task_dirs) -> tuple[list[str], list[str]]:
    """The task names and task folders, after checking every argument of :func:`zero_shot`."""
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise SvdkitError("no zero-shot task given: name one or more lm-eval tasks, e.g. arc_easy,hellaswag")
    if tokenizer is None:
        raise SvdkitError("zero-shot evaluation needs the model's tokenizer")
    counts = {"batch_size": (batch_size, 1), "num_fewshot": (num_fewshot, 0), "limit": (limit, 1)}
    try:
        for name, (value, minimum) in counts.items():
            if value is not None or name != "limit":  # limit None: every document
                integer(minimum)(name, value)
    except ValueError as e:
        raise SvdkitError(str(e)) from None
    missing = [str(d) for d in task_dirs if not Path(d).is_dir()]
    if missing:
        raise SvdkitError(f"task folder '{missing[0]}' does not exist: give a folder of lm-eval task YAML files")
    return tasks, [str(d) for d in task_dirs]


def local_task_dirs(tasks: list[str], task_data, num_fewshot: int) -> list[str]:
    """[the folder of offline task YAMLs] for those of `tasks` that the local task data (`task_data`, else
    ``$SVDKIT_DATA``) holds, made now if needed; [] when none is local. Missing or malformed files and
    few-shot prompts (the files hold only the scored split) are refused."""
    local = [t for t in tasks if t in LOCAL_TASKS]
    data = task_data_dir(task_data)
    if not local or data is None:
        return []
    if num_fewshot:
        raise SvdkitError(
            f"the local task files of {', '.join(local)} hold only the scored split, so few-shot examples would "
            "come from the documents being scored: use num_fewshot 0 with local task data"
        )
    return [str(write_local_tasks(local, data, cache_dir()))]


def _results(out: dict | None) -> dict[str, dict[str, float | int | None]]:
    """lm-eval's output as {task: {metric: value, ..., "samples": documents scored}}."""
    if out is None:  # lm-eval returns nothing on a non-zero rank of a distributed run
        return {}
    counts = out.get("n-samples", {})
    results: dict[str, dict[str, float | int | None]] = {}
    for name, entry in out["results"].items():
        metrics = _flatten(entry)
        n = counts.get(name, {})
        if isinstance(n, dict) and "effective" in n:
            metrics["samples"] = int(n["effective"])
        results[name] = metrics
    return results


def _copy(tokenizer):
    """lm-eval sets a pad token on the tokenizer it gets: give it a copy, not the caller's."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # a tokenizer that cannot be copied is lent as it is
        return tokenizer


def format_results(results: dict[str, dict[str, float | int | None]]) -> str:
    """:func:`zero_shot`'s results as a table: one line per task and metric, ``value ± stderr`` and samples."""
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, sep, filt = key.partition(",")
            if key == "samples" or metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr{sep}{filt}")
            shown = "n/a" if value is None else f"{value:.4f}"
            rows.append((task, key, shown + ("" if stderr is None else f" ± {stderr:.4f}"), metrics.get("samples")))
    if not rows:
        return "no metrics"
    wt = max(len("task"), *(len(r[0]) for r in rows))
    wm = max(len("metric"), *(len(r[1]) for r in rows))
    wv = max(len("value"), *(len(r[2]) for r in rows))
    lines = [f"{'task':<{wt}}  {'metric':<{wm}}  {'value':<{wv}}  samples"]
    for task, key, shown, n in rows:
        lines.append(f"{task:<{wt}}  {key:<{wm}}  {shown:<{wv}}  {'' if n is None else n}".rstrip())
    return "\n".join(lines)
