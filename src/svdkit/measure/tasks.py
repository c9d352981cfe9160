"""The protocol's five zero-shot tasks read offline, through lm-evaluation-harness's own task definitions.

ARC-Easy, PIQA, HellaSwag, WinoGrande and BoolQ are published as files (``data/zeroshot`` of the
protocol: AI2's ARC jsonl, PIQA's jsonl plus a labels list, WinoGrande 1.1's dev jsonl, SuperGLUE's BoolQ
jsonl, HellaSwag already in lm-eval's document form). :func:`write_local_tasks` turns each into the rows of
the Hugging Face dataset lm-eval's task reads (``allenai/ai2_arc``, ``baber/piqa``, ``Rowan/hellaswag``
after its ``process_docs``, ``allenai/winogrande``, ``super_glue/boolq``) and writes a task YAML that
``include``s lm-eval's own YAML and changes only where the documents come from (``dataset_path: json``
with local ``data_files``). Prompts, choices, targets and metrics (acc, acc_norm, their standard errors)
stay lm-eval's, so the numbers are lm-eval's numbers; nothing is fetched from the hub.

The converted files and the ``datasets`` cache of them live in svdkit's cache folder, keyed by the size
and modification time of the source files, so a second evaluation converts nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import SvdkitError

__all__ = ["LOCAL_TASKS", "LocalTask", "task_data_dir", "write_local_tasks"]


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _arc(folder: Path) -> Iterator[dict]:
    """AI2's layout {question: {stem, choices: [{text, label}]}, answerKey} as allenai/ai2_arc's rows."""
    for d in _jsonl(folder / "ARC-Easy-Test.jsonl"):
        choices = d["question"]["choices"]
        yield {
            "id": d["id"],
            "question": d["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": d["answerKey"],
        }


def _paired(docs: Iterator[dict], labels: list[str], what: str) -> Iterator[tuple[dict, str]]:
    docs = list(docs)
    if len(docs) != len(labels):
        raise SvdkitError(f"{what}: {len(docs)} documents but {len(labels)} labels: the files do not belong together")
    return zip(docs, labels, strict=True)


def _piqa(folder: Path) -> Iterator[dict]:
    """PIQA's jsonl plus its line-aligned labels as baber/piqa's rows {goal, sol1, sol2, label}."""
    pairs = _paired(_jsonl(folder / "valid.jsonl"), _labels(folder / "valid-labels.lst"), "piqa")
    for d, label in pairs:
        yield {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(label)}


def _winogrande(folder: Path) -> Iterator[dict]:
    """WinoGrande 1.1 dev as allenai/winogrande's rows {sentence, option1, option2, answer}."""
    for d in _jsonl(folder / "dev.jsonl"):
        yield {k: str(d[k]) for k in ("sentence", "option1", "option2", "answer")}


def _boolq(folder: Path) -> Iterator[dict]:
    """SuperGLUE's BoolQ (label "true"/"false" or a boolean) as super_glue/boolq's rows (label 1 = yes)."""
    for d in _jsonl(folder / "val.jsonl"):
        label = d["label"]
        truth = label if isinstance(label, bool) else str(label).strip().lower() == "true"
        yield {"question": d["question"], "passage": d["passage"], "idx": int(d["idx"]), "label": int(truth)}


def _hellaswag(folder: Path) -> Iterator[dict]:
    """HellaSwag in lm-eval's document form {query, choices, gold}: the rows its process_docs would make."""
    for d in _jsonl(folder / "hellaswag_val_lmeval.jsonl"):
        yield {"query": d["query"], "choices": list(d["choices"]), "label": str(int(d["gold"]))}


@dataclass(frozen=True)
class LocalTask:
    """One task read offline: lm-eval's YAML, the split it scores, the files it needs and their conversion."""

    yaml: str
    """lm-eval's task YAML, relative to lm_eval/tasks"""
    folder: str
    """the task's folder inside the data folder"""
    files: tuple[str, ...]
    split: str
    """the split lm-eval scores (its test_split, else its validation_split)"""
    rows: Callable[[Path], Iterator[dict]]
    extra: str = ""
    """YAML lines that replace more of lm-eval's task than where its data comes from"""


LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask("arc/arc_easy.yaml", "arc_easy", ("ARC-Easy-Test.jsonl",), "test", _arc),
    "piqa": LocalTask("piqa/piqa.yaml", "piqa", ("valid.jsonl", "valid-labels.lst"), "validation", _piqa),
    "hellaswag": LocalTask(
        "hellaswag/hellaswag.yaml",
        "hellaswag",
        ("hellaswag_val_lmeval.jsonl",),
        "validation",
        _hellaswag,
        "process_docs: null\n",  # the rows are process_docs' output already
    ),
    "winogrande": LocalTask("winogrande/default.yaml", "winogrande", ("dev.jsonl",), "validation", _winogrande),
    "boolq": LocalTask("super_glue/boolq/default.yaml", "boolq", ("val.jsonl",), "validation", _boolq),
}
"""the protocol's zero-shot tasks, by lm-eval's task name"""


def task_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The folder of the zero-shot task files: `explicit` (``--task-data``), else ``$SVDKIT_DATA``, each
    taken as the folder itself or as a data folder holding ``zeroshot/``; None when neither is set.
    An explicit folder that does not exist is an error."""
    given = explicit if explicit is not None else os.environ.get("SVDKIT_DATA") or None
    if given is None:
        return None
    folder = Path(given)
    if not folder.is_dir():
        if explicit is None:
            return None  # $SVDKIT_DATA may point elsewhere for texts only
        raise SvdkitError(f"task data folder '{folder}' does not exist: give the folder holding arc_easy/, piqa/, ...")
    nested = folder / "zeroshot"
    return nested if nested.is_dir() and not (folder / "arc_easy").is_dir() else folder


def _key(data: Path, names: list[str]) -> str:
    """A cache key from lm-eval's version, the tasks and the size and modification time of their files."""
    import lm_eval

    h = hashlib.sha256(getattr(lm_eval, "__version__", "?").encode())
    for name in names:
        task = LOCAL_TASKS[name]
        for file in task.files:
            st = (data / task.folder / file).stat()
            h.update(f"{name}/{file}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _missing(data: Path, names: list[str]) -> list[str]:
    return [str(data / LOCAL_TASKS[n].folder / f) for n in names for f in LOCAL_TASKS[n].files]


def write_local_tasks(names: list[str], data: Path, cache: Path) -> Path:
    """A folder of lm-eval task YAMLs for `names` (keys of LOCAL_TASKS) reading the files under `data`:
    made once in `cache` (atomically, by a rename), reused while the files are unchanged."""
    missing = [p for p in _missing(data, names) if not Path(p).is_file()]
    if missing:
        raise SvdkitError(
            f"zero-shot task data is missing: {', '.join(missing)}; --task-data (or $SVDKIT_DATA) must hold the "
            "protocol's zeroshot/ folder"
        )
    folder = cache / "zeroshot" / _key(data, names)
    if (folder / "done").is_file():
        return folder
    import lm_eval

    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in names:
            _write_task(name, data, tmp, folder, tasks_root)
        (tmp / "done").write_text("")
        try:
            tmp.rename(folder)
        except OSError:  # another process made it meanwhile
            if not (folder / "done").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_task(name: str, data: Path, tmp: Path, final: Path, tasks_root: Path) -> None:
    task = LOCAL_TASKS[name]
    try:
        rows = list(task.rows(data / task.folder))
    except (KeyError, TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise SvdkitError(f"zero-shot task data of {name} under {data} is not in the expected layout: {e!r}") from e
    (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    splits = {"training_split": None, "validation_split": None, "test_split": None, f"{task.split}_split": task.split}
    lines = [
        f"include: {json.dumps(str(tasks_root / task.yaml))}",
        f"task: {name}",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        f"  data_files: {{{task.split}: {json.dumps(str(final / f'{name}.jsonl'))}}}",
        f"  cache_dir: {json.dumps(str(final / 'hf-cache'))}",
        *(f"{k}: {'null' if v is None else v}" for k, v in splits.items()),
        "fewshot_split: null",
    ]
    (tmp / f"{name}.yaml").write_text("\n".join(lines) + "\n" + task.extra, encoding="utf-8")
