"""One owner per output (svdkit.core.owner): a second process is refused naming the first, before it touches
anything at the output; the lock dies with its process (kill -9 too); the output that is the model read is
refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import assert_error, run_cli

import svdkit
from svdkit.core.atomic import check_not_source
from svdkit.core.owner import lock_path, own_output
from svdkit.errors import SvdkitError
from svdkit.pipeline.partial import partial_path


@pytest.fixture
def holder():
    """Start a process that holds an output's lock until killed: holder(path) -> the process."""
    started = []

    def start(path):
        code = textwrap.dedent(f"""
            import sys, time
            from svdkit.core.owner import own_output
            with own_output({str(path)!r}):
                print("held", flush=True)
                time.sleep(600)
        """)
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        started.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in started:
        p.kill()
        p.wait()


def test_a_second_process_is_refused_naming_the_first_until_the_first_is_killed(tmp_path, holder):
    out = tmp_path / "out"
    p = holder(out)
    with pytest.raises(SvdkitError) as e:
        with own_output(out):
            pass
    who = f"pid {p.pid} on {socket.gethostname()}"
    assert str(e.value) == f"another svdkit process ({who}) is writing {out}: wait for it"
    p.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the lock, the file stays
    p.wait()
    assert lock_path(out).is_file()
    with own_output(out):
        assert lock_path(out).is_file()
    assert not lock_path(out).exists() and not out.exists()


def test_the_lock_is_reentrant_in_one_process_and_one_name_per_output(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with own_output(tmp_path / "real" / "out"):
        with own_output(tmp_path / "link" / "out"):  # the same output through a symbolic link: ours already
            assert lock_path(tmp_path / "real" / "out").is_file()
        assert lock_path(tmp_path / "real" / "out").is_file()  # still held by the outer one
    assert not lock_path(tmp_path / "real" / "out").exists()


def test_save_to_an_output_another_process_writes_is_refused(tmp_path, holder, tiny_tokenizer):
    from conftest import tiny_model

    holder(tmp_path / "out")
    with pytest.raises(SvdkitError, match="is writing"):
        svdkit.save(tiny_model(), tiny_tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_overwrite_never_removes_the_partial_folder_of_a_live_run(capsys, tmp_path, holder, tiny_folder):
    out = tmp_path / "out"
    kept = partial_path(out)
    kept.mkdir()
    (kept / "state.json").write_text('{"layers_done": 1}\n')
    p = holder(out)
    argv = ["compress", tiny_folder, "--calib-samples", 2, "--calib-seqlen", 32, "--output", out, "--overwrite"]
    code, _, err = run_cli(capsys, *argv)
    assert_error(code, err, f"another svdkit process (pid {p.pid} on {socket.gethostname()}) is writing {out}")
    assert (kept / "state.json").read_text() == '{"layers_done": 1}\n' and not out.exists()
    code, _, err = run_cli(capsys, *argv, "--heal", "kd")  # a run that loads the model whole: refused alike
    assert_error(code, err, "is writing")
    p.kill()
    p.wait()
    code, _, err = run_cli(capsys, *argv)
    assert code == 0 and (out / "config.json").is_file() and not kept.exists(), err
    assert not lock_path(out).exists()


@pytest.mark.parametrize("command", ["compress", "densify", "export"])
def test_an_output_that_is_the_model_read_or_holds_it_is_refused(capsys, tmp_path, tiny_folder, command):
    before = sorted(os.listdir(tiny_folder))
    for output, what in ((tiny_folder, "is the model being read"), (tiny_folder.parent, "is a folder holding")):
        code, _, err = run_cli(capsys, command, tiny_folder, "--output", output, "--overwrite")
        assert_error(code, err, what)
    assert sorted(os.listdir(tiny_folder)) == before
    check_not_source("smollm2-135m", tmp_path / "x")  # not a local path: nothing to protect


def test_an_output_inside_the_model_folder_is_allowed(tmp_path, tiny_folder):
    check_not_source(tiny_folder, tiny_folder / "compressed")


def test_an_output_name_too_long_for_its_hidden_siblings_is_refused_before_loading(capsys, tmp_path, tiny_folder):
    name = "o" * 245  # legal itself; ".NAME.svdkit-partial" is 261 bytes
    code, _, err = run_cli(capsys, "compress", tiny_folder, "--output", tmp_path / name)
    assert_error(code, err, "bytes long, but svdkit keeps hidden folders beside it")
    assert "shorten it to at most 239 bytes" in err and sorted(os.listdir(tmp_path)) == [tiny_folder.name]
