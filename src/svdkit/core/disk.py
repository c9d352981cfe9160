"""The disk: temporary folders that a later run can prove stale and remove, and the up-front checks that a
location is writable and has room for what will be written there.

Every temporary folder svdkit makes (a save's hidden sibling, the statistics spill, the bundled model's
conversion) comes from :func:`make_scratch_dir`, which writes an owner file (pid and host) into it. A
process killed before it could clean up (SIGKILL, a power cut) leaves its folder behind; the next
scratch folder made with the same prefix in the same parent first removes the folders it can prove
stale: their owner file names this host and a pid that no longer runs. A folder without an owner file,
or of another host, or of a live process, is never touched.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import SvdkitError

__all__ = [
    "OWNER_FILE",
    "make_scratch_dir",
    "scratch_dir",
    "sweep_stale",
    "owner",
    "is_stale",
    "remove_scratch",
    "io_reason",
    "nearest_existing",
    "check_writable",
    "check_free_space",
    "human_bytes",
    "make_ordinary",
]

OWNER_FILE = ".svdkit-owner"
"""inside every temporary folder: JSON {"pid", "host"} of the process that made it"""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _started(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22); "" where unknown."""
    fields = _read(f"/proc/{pid}/stat").rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def owner() -> dict:
    """Who makes a temporary folder: pid, its start time, host, boot and pid namespace (the last three
    tell whether the pid can be looked up here at all)."""
    return {
        "pid": os.getpid(),
        "started": _started(os.getpid()),
        "host": socket.gethostname(),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pidns": _pid_namespace(),
    }


def is_stale(folder: Path) -> bool:
    """True only when `folder`'s owner provably no longer runs: same host, and either the machine has
    rebooted since, or (same boot, same pid namespace) the pid is gone or now another process's."""
    try:
        was = json.loads((folder / OWNER_FILE).read_text())
        pid = int(was["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no owner file, or one half written: not provably ours
    now = owner()
    if was.get("host") != now["host"] or pid <= 0:
        return False
    if was.get("boot") and now["boot"] and was["boot"] != now["boot"]:
        return True
    if was.get("boot") != now["boot"] or was.get("pidns") != now["pidns"]:
        return False  # another container's process, say: its pid means nothing here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return bool(was.get("started")) and _started(pid) not in ("", was["started"])


def remove_scratch(path: Path) -> None:
    """Remove a temporary folder, its owner file last: an interrupted removal leaves a folder still marked."""
    for entry in path.iterdir() if path.is_dir() else ():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name != OWNER_FILE:
            entry.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def sweep_stale(parent: str | os.PathLike, pattern: str) -> list[Path]:
    """Remove the folders in `parent` whose name matches the glob `pattern` and whose owner is provably
    gone; returns them."""
    try:
        entries = sorted(Path(parent).glob(pattern))
    except OSError:
        return []
    removed = []
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink() and is_stale(entry):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def make_scratch_dir(prefix: str, parent: str | os.PathLike | None = None) -> Path:
    """A new private folder ``parent/prefixXXXX`` (default parent: the system's temporary folder) holding
    an owner file, made after sweeping stale siblings of the same prefix. The caller removes it.

    Whatever should outlive the folder is written into a subfolder and renamed out of it, so the owner
    file never travels with it."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep_stale(parent, prefix + "*")
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        (path / OWNER_FILE).write_text(json.dumps(owner()))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


@contextmanager
def scratch_dir(prefix: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """:func:`make_scratch_dir` as a ``with`` block: the folder is removed on leaving it, whatever happens."""
    path = make_scratch_dir(prefix, parent)
    try:
        yield path
    finally:
        remove_scratch(path)


def make_ordinary(path: str | os.PathLike) -> None:
    """Give a file the mode of an ordinary new file (0666 less the umask): writers that go through a
    private temporary file leave it 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` itself if it exists, else its nearest existing ancestor (absolute)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def io_reason(e: Exception) -> str:
    """'FILE: reason' of an I/O error (an OSError, or safetensors' error: its message)."""
    if not isinstance(e, OSError):
        return str(e)  # safetensors says "... I/O error: No space left on device" itself
    where = f"{e.filename}: " if e.filename else "I/O error: "
    return where + (e.strerror or str(e))


def _why(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "read-only for this user (permission denied)"
    return e.strerror or str(e)


def check_writable(path: str | os.PathLike, what: str = "the output") -> Path:
    """Prove that a file can be created where `path` is (or would be made): in its nearest existing folder.

    Returns that folder; raises :class:`SvdkitError` naming it and the reason if not."""
    folder = nearest_existing(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".svdkit-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SvdkitError(f"cannot write to {folder}: {_why(e)}: choose another location for {what}") from e
    return folder


def human_bytes(n: int) -> str:
    """1.5 GB, 230.2 MB (binary units, as the demo's table)."""
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def check_free_space(path: str | os.PathLike, need: int, what: str = "the output") -> None:
    """Refuse when the file system holding `path` (or its nearest existing ancestor) has less than `need`
    bytes free."""
    folder = nearest_existing(path)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # nothing to measure (the write itself will say what is wrong)
    if need > free:
        raise SvdkitError(
            f"not enough free space in {folder} for {what}: it needs about {human_bytes(need)}, "
            f"{human_bytes(free)} free: free some space or choose another location"
        )
