"""Temporary folders a later run can prove stale (owner file with pid and host), and the up-front checks
that a location is writable and has room."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from collections import namedtuple

import pytest
from conftest import dead_pid, mark_owner

import svdkit
from svdkit.core import disk
from svdkit.core.disk import (
    OWNER_FILE,
    check_free_space,
    check_writable,
    make_scratch_dir,
    scratch_dir,
    sweep_stale,
)

Usage = namedtuple("Usage", "total used free")


def leftover(parent, name: str, pid: int | None, **changes):
    """A folder `name` in `parent` as a run with `pid` leaves it (pid None: no owner file; `changes` alter
    the owner file's fields)."""
    folder = parent / name
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half written")
    if pid is not None:
        mark_owner(folder, pid, **changes)
    return folder


def test_a_scratch_folder_names_its_owner_and_is_removed_whatever_happens(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with scratch_dir(".out.tmp-", tmp_path) as tmp:
            owner = json.loads((tmp / OWNER_FILE).read_text())
            assert owner == disk.owner() and owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_only_folders_of_a_dead_process_on_this_host_are_swept(tmp_path):
    stale = leftover(tmp_path, ".out.tmp-dead", dead_pid())
    alive = leftover(tmp_path, ".out.tmp-alive", os.getpid())
    unmarked = leftover(tmp_path, ".out.tmp-unmarked", None)
    elsewhere = leftover(tmp_path, ".out.tmp-elsewhere", dead_pid(), host="another-host")
    container = leftover(tmp_path, ".out.tmp-container", dead_pid(), pidns="another namespace")
    rebooted = leftover(tmp_path, ".out.tmp-rebooted", os.getpid(), boot="an earlier boot")
    reused = leftover(tmp_path, ".out.tmp-reused", os.getpid(), started="1")  # the pid is another process now
    other_prefix = leftover(tmp_path, ".other.tmp-dead", dead_pid())
    garbled = leftover(tmp_path, ".out.tmp-garbled", None)
    (garbled / OWNER_FILE).write_text("{not json")
    fresh = make_scratch_dir(".out.tmp-", tmp_path)  # sweeps first
    assert not any(f.exists() for f in (stale, rebooted, reused))
    assert all(f.is_dir() for f in (alive, unmarked, elsewhere, container, other_prefix, garbled, fresh))
    assert sweep_stale(tmp_path, ".out.tmp-*") == []  # nothing else is provably stale
    shutil.rmtree(fresh)


def test_writable_location_is_proved_by_a_probe(tmp_path, monkeypatch):
    assert check_writable(tmp_path / "a" / "b") == tmp_path  # the nearest existing folder
    assert list(tmp_path.iterdir()) == []  # the probe is gone

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(svdkit.SvdkitError, match=f"cannot write to {tmp_path}: read-only file system"):
        check_writable(tmp_path / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(svdkit.SvdkitError, match="cannot write to .*ro: read-only for this user"):
            check_writable(ro / "out")
    finally:
        ro.chmod(0o755)


def test_free_space_is_checked(tmp_path, monkeypatch):
    check_free_space(tmp_path, 1000)
    monkeypatch.setattr("shutil.disk_usage", lambda p: Usage(10**9, 10**9 - 2**20, 2**20))
    check_free_space(tmp_path, 2**20)
    with pytest.raises(svdkit.SvdkitError, match=r"not enough free space .* needs about 2\.0 MB, 1\.0 MB free"):
        check_free_space(tmp_path / "out", 2**21)
