"""Faults of the machine, not of the input: a read-only output, a full disk (checked before the model is
loaded, and met while writing), SIGTERM / SIGINT during the work, and temporary folders that a killed run
left behind. Each ends with one line and leaves no temporary folder."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
from conftest import assert_error, compress_small, dead_pid, mark_owner, run_cli, tiny_model
from safetensors import SafetensorError
from transformers import PreTrainedModel

import svdkit
from svdkit.core.disk import OWNER_FILE
from svdkit.saved.contents import dense_bytes

Usage = namedtuple("Usage", "total used free")
pytestmark = pytest.mark.usefixtures("offline_one_thread")


def calib(text_file) -> list[str]:
    return ["--calib", str(text_file), "--calib-samples", "2", "--calib-seqlen", "32", "--device", "cpu"]


def whole(tmp_path) -> list[str]:
    """Flags of a run that loads the model whole, spills every matrix's statistics and saves at once: the
    sensitivity allocation (a small search, its table in `tmp_path`)."""
    options = ["windows=1", "seqlen=16", "grid=[0.3,0.6]", f"cache={tmp_path / 'table.json'}"]
    return ["--allocation", "sensitivity", *[x for o in options for x in ("--allocation-option", o)]]


def hidden(folder) -> list[str]:
    """Temporary folders (hidden siblings, statistics spills) in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".", "svdkit-stats-")))


def compressed_folder(tmp_path, tokenizer):
    model = tiny_model()
    compress_small(model, ratio=0.4)
    return svdkit.save(model, tokenizer, tmp_path / "low")


@pytest.fixture()
def no_load(monkeypatch):
    """Fail the test if a command loads its model."""
    calls = []
    for module in ("compress", "densify"):
        monkeypatch.setattr(f"svdkit.cli.{module}.load_model", lambda *a, **k: calls.append(a) or 1 / 0)
    return calls


# --- checked up front ---------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_output_location_is_refused_before_loading(capsys, tmp_path, tiny_folder, text_file, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, "compress", tiny_folder, *calib(text_file), "--output", ro / "out")
    finally:
        ro.chmod(0o755)
    assert_error(code, err, f"cannot write to {ro}: read-only for this user")
    assert no_load == [] and list(ro.iterdir()) == []


def test_read_only_file_system_is_refused_before_loading(capsys, tmp_path, tiny_tokenizer, no_load, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    low = compressed_folder(tmp_path, tiny_tokenizer)
    monkeypatch.setattr("tempfile.mkstemp", read_only)
    code, _, err = run_cli(capsys, "densify", low, "--output", tmp_path / "sub" / "out")
    assert_error(code, err, f"cannot write to {tmp_path}: read-only file system")
    assert no_load == [] and not (tmp_path / "sub").exists()


@pytest.mark.parametrize("command", ["compress", "compress --densify", "densify"])
def test_too_little_free_space_is_refused_before_loading(
    capsys, tmp_path, tiny_folder, tiny_tokenizer, text_file, no_load, monkeypatch, command
):
    free = 4 * svdkit.count_parameters(tiny_model()) // 2  # half the dense float32 weights
    if command == "densify":  # needs the dense size
        argv = ["densify", compressed_folder(tmp_path, tiny_tokenizer)]
    elif command == "compress":  # needs about (1 - 0.4) of it
        argv = ["compress", tiny_folder, "--ratio", "0.4", *calib(text_file)]
    else:
        argv = ["compress", tiny_folder, "--ratio", "0.6", "--densify", *calib(text_file)]
    monkeypatch.setattr("shutil.disk_usage", lambda p: Usage(10**12, 10**12 - free, free))
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "out")
    assert_error(code, err, f"not enough free space in {tmp_path} for the output")
    assert no_load == [] and not (tmp_path / "out").exists()


def test_the_size_estimates_come_close_to_what_is_written(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, "compress", tiny_folder, "--ratio", "0.6", *calib(text_file), "--output", out)
    assert code == 0
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))  # streamed: one shard per layer
    assert 0.9 * written <= dense_bytes(tiny_folder, 0.6) <= 1.1 * written  # the embeddings are kept whole
    code, _, _ = run_cli(capsys, "densify", out, "--output", tmp_path / "dense")
    assert code == 0
    assert dense_bytes(out) <= (tmp_path / "dense" / "model.safetensors").stat().st_size


def test_too_little_room_for_the_statistics_spill_is_refused_before_calibration(
    capsys, tmp_path, tiny_folder, text_file, monkeypatch
):
    stats = tmp_path / "stats"
    stats.mkdir()
    real = __import__("shutil").disk_usage

    def usage(path):  # the output has room, the statistics folder 1 kB
        return Usage(10**12, 10**12, 1000) if str(path).startswith(str(stats)) else real(path)

    monkeypatch.setattr("shutil.disk_usage", usage)
    monkeypatch.setattr("svdkit.calibration.store.StatisticsStore.put_layer", lambda *a: 1 / 0)
    argv = ["compress", tiny_folder, *calib(text_file), *whole(tmp_path), "--statistics-dir", stats]
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "out")
    assert_error(code, err, f"not enough free space in {stats} for the calibration statistics")
    assert list(stats.iterdir()) == [] and not (tmp_path / "out").exists()


# --- met while writing ------------------------------------------------------------------------------


def disk_full(kind: str):
    def save_pretrained(self, folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        if kind == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return save_pretrained


def shard_disk_full(kind: str):
    """The same fault met by a streamed compression, while it writes a layer's shard."""
    write = disk_full(kind)

    def save_file(tensors, filename, metadata=None):
        write(None, __import__("pathlib").Path(filename).parent)

    return save_file


@pytest.mark.parametrize("command,kind", [("densify", "safetensors"), ("compress --allocation sensitivity", "oserror")])
def test_disk_full_while_saving_is_one_line_and_leaves_nothing(
    capsys, tmp_path, tiny_folder, tiny_tokenizer, text_file, monkeypatch, command, kind
):
    if command == "densify":
        argv = ["densify", compressed_folder(tmp_path, tiny_tokenizer)]
    else:
        argv = ["compress", tiny_folder, *calib(text_file), *whole(tmp_path)]  # loaded whole, saved at once
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full(kind))
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "out")
    assert_error(code, err, f"could not write {tmp_path / 'out'} (")
    assert "No space left on device" in err and "nothing was written" in err
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("low", "table.json"))
    assert left == ["text.txt", "tiny-llama"]


@pytest.mark.parametrize("extra,kind", [([], "oserror"), (["--densify"], "safetensors")])
def test_disk_full_in_a_streamed_run_keeps_the_finished_layers_for_a_resume(
    capsys, tmp_path, tiny_folder, text_file, monkeypatch, extra, kind
):
    from svdkit.saved import shards

    real, calls = shards.save_file, []

    def full_at_the_second(tensors, filename, metadata=None):  # layer 0's shard fits, layer 1's does not
        calls.append(filename)
        if len(calls) == 2:
            shard_disk_full(kind)(tensors, filename, metadata)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(shards, "save_file", full_at_the_second)
    argv = ["compress", tiny_folder, *calib(text_file), *extra, "--output", tmp_path / "out"]
    code, _, err = run_cli(capsys, *argv)
    kept = tmp_path / ".out.svdkit-partial"
    assert_error(code, err, f"could not write {tmp_path / 'out'} (")
    assert "No space left on device" in err and f"the finished layers are kept in {kept}" in err and "--resume" in err
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == [kept.name]
    assert json.loads((kept / "state.json").read_text())["layers_done"] == 1
    monkeypatch.setattr(shards, "save_file", real)  # room again
    (kept / "model.safetensors").unlink()  # the fake fault's half-written file (real writes go to NAME.partial)
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert (tmp_path / "out" / "config.json").is_file() and hidden(tmp_path) == []


def test_disk_full_while_spilling_statistics_is_one_line_and_leaves_nothing(
    capsys, tmp_path, tiny_folder, text_file, monkeypatch
):
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("svdkit.calibration.store.save_file", full)
    argv = ["compress", tiny_folder, *calib(text_file), *whole(tmp_path), "--statistics-dir", tmp_path]
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "out")
    assert_error(code, err, "cannot write calibration statistics")
    assert "No space left on device" in err and hidden(tmp_path) == []


def test_any_other_io_error_is_one_line(capsys, tmp_path, tiny_folder, text_file, monkeypatch):
    def fails(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", "/data/shard-3.bin")

    monkeypatch.setattr("svdkit.cli.compress.compress_folder", fails)
    code, _, err = run_cli(capsys, "compress", tiny_folder, *calib(text_file), "--output", tmp_path / "out")
    assert_error(code, err, "/data/shard-3.bin: Input/output error")


# --- signals and leftovers ------------------------------------------------------------------------------

DRIVER = """
import sys, time
from pathlib import Path
import transformers
from svdkit.calibration.store import StatisticsStore
from svdkit.cli import main

from svdkit.pipeline.streaming import Partial

ready, stage = Path(sys.argv[1]), sys.argv[2]
cls, name = {
    "save": (transformers.PreTrainedModel, "save_pretrained"),
    "spill": (StatisticsStore, "put_layer"),
    "layer": (Partial, "mark_done"),
}[stage]
original = getattr(cls, name)

def then_wait(self, *args, **kwargs):  # the stage runs, then the run waits for the test's signal
    original(self, *args, **kwargs)
    ready.touch()
    time.sleep(300)

setattr(cls, name, then_wait)
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("stage", ["save", "spill"])
def test_sigterm_during_the_work_exits_143_with_one_line_and_leaves_nothing(tmp_path, tiny_folder, text_file, stage):
    """In a process of its own: the signal comes from outside, as from `timeout`, Docker or Slurm."""
    stats = tmp_path / "stats"
    argv = ["compress", str(tiny_folder), *calib(text_file), "--output", str(tmp_path / "out")]
    argv += [*whole(tmp_path), "--statistics-dir", str(stats)]  # loads the whole model and saves it at once
    lines = _terminated(tmp_path, stage, argv)
    assert lines[-1] == "svdkit: interrupted by SIGTERM"
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []
    assert not stats.exists() or list(stats.iterdir()) == []


def _terminated(tmp_path, stage: str, argv: list[str]) -> list[str]:
    """Run `argv` in a process of its own until `stage` is reached, then SIGTERM it: its stderr lines."""
    driver, ready = tmp_path / "driver.py", tmp_path / "ready"
    driver.write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(driver), str(ready), stage, *argv], stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate(timeout=60)[1].decode() if proc.poll() is not None else "no progress"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 143 and "Traceback" not in err, err
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip()]


def test_sigterm_during_a_streamed_run_keeps_the_finished_layers_for_resume(capsys, tmp_path, tiny_folder, text_file):
    argv = ["compress", str(tiny_folder), *calib(text_file), "--output", str(tmp_path / "out")]
    lines = _terminated(tmp_path, "layer", argv)
    kept = tmp_path / ".out.svdkit-partial"
    assert lines[-1] == f"svdkit: interrupted by SIGTERM; the finished layers are kept in {kept}: the same " + (
        "command with --resume continues"
    )
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == [kept.name]
    code, _, err = run_cli(capsys, *argv)
    assert_error(code, err, "add --resume to continue it")
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert (tmp_path / "out" / "config.json").is_file() and hidden(tmp_path) == []


def test_ctrl_c_during_the_save_exits_130_and_leaves_nothing(capsys, tmp_path, tiny_folder, text_file, monkeypatch):
    original = PreTrainedModel.save_pretrained

    def interrupted(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    argv = ["compress", tiny_folder, *calib(text_file), *whole(tmp_path)]  # loaded whole, saved at once
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "out")
    assert code == 130 and err.strip().splitlines()[-1] == "svdkit: interrupted by SIGINT"
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_the_next_run_sweeps_what_a_killed_run_left(capsys, tmp_path, tiny_folder, text_file):
    stats = tmp_path / "stats"
    owner, live = dead_pid(), os.getpid()
    for folder, marker in [
        (tmp_path / ".out.tmp-killed", owner),
        (tmp_path / ".other.tmp-killed", owner),  # a killed save of another folder
        (tmp_path / ".out.old-killed", owner),
        (stats / "svdkit-stats-killed", owner),
        (tmp_path / ".out.tmp-running", live),
        (stats / "svdkit-stats-someone-elses", None),
    ]:
        folder.mkdir(parents=True)
        (folder / "layer-0.safetensors").write_bytes(b"partial")
        if marker is not None:
            mark_owner(folder, marker)
    argv = ["compress", tiny_folder, *calib(text_file), *whole(tmp_path), "--statistics-dir", stats]
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "out")
    assert code == 0, err
    assert hidden(tmp_path) == [".out.tmp-running"]
    assert [p.name for p in stats.iterdir()] == ["svdkit-stats-someone-elses"]
    assert OWNER_FILE not in [p.name for p in (tmp_path / "out").iterdir()]


def test_disk_full_while_the_tokenizer_is_written_is_one_line_too(
    capsys, tmp_path, tiny_folder, text_file, monkeypatch
):
    from transformers import PreTrainedTokenizerBase

    def full(self, folder, *args, **kwargs):  # what the tokenizers library raises: a bare Exception
        raise Exception("No space left on device (os error 28)")  # noqa: TRY002

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full)
    code, _, err = run_cli(capsys, "compress", tiny_folder, *calib(text_file), "--output", tmp_path / "out")
    assert_error(code, err, "No space left on device (os error 28)); the finished layers are kept in")
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == [".out.svdkit-partial"]
    argv = ["compress", tiny_folder, *calib(text_file), *whole(tmp_path), "--output", tmp_path / "o"]
    code, _, err = run_cli(capsys, *argv)
    assert_error(code, err, "No space left on device (os error 28)); nothing was written")  # loaded whole
    assert not (tmp_path / "o").exists() and hidden(tmp_path) == [".out.svdkit-partial"]
