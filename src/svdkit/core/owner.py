"""One owner per output: every writer of an output folder holds a lock file beside it
(``.NAME.svdkit-lock``) from before it touches anything there (a partial folder it would remove for
``--overwrite`` included) until it is done, so a second process is refused in one line naming the first.

The lock is ``flock`` on that file, released by the kernel when its process ends however it ends (``kill -9``
too), so a lock file left behind never blocks anyone. Within one process the lock is re-entrant: the command
line takes it for the whole run, and the save inside takes it again without blocking itself. Work that every
process of a torchrun group does together takes it through :func:`group_owns`: rank 0 holds it, and a refusal
ends every rank.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

from ..errors import SvdkitError
from .disk import check_writable, nearest_existing, owner
from .distributed import agree

__all__ = ["group_owns", "lock_path", "own_output"]

LONGEST_SIBLING = ".svdkit-partial"
"""the longest suffix of the hidden siblings a writer puts beside an output (``.NAME.svdkit-partial``)"""

_HELD: dict[Path, list] = {}
"""outputs this process owns -> [times taken, the open lock file]"""


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of `output`: ``.NAME.svdkit-lock`` beside it."""
    path = _key(output)
    return path.parent / f".{path.name}.svdkit-lock"


@contextmanager
def group_owns(output: str | os.PathLike) -> Iterator[None]:
    """:func:`own_output` for work every process of a torchrun group calls together: rank 0 holds the lock,
    and its refusal is raised by every process (one process: :func:`own_output` itself)."""
    with ExitStack() as stack:
        agree(lambda: stack.enter_context(own_output(output)))
        yield


@contextmanager
def own_output(output: str | os.PathLike) -> Iterator[None]:
    """Hold `output`'s lock meanwhile; refuse at once, naming the owner, when another process holds it. A
    missing parent folder is made for the lock (once a file is proven creatable there) and removed again if it
    is still empty at the end."""
    key = _key(output)
    _check_name(key)
    if key in _HELD:
        _HELD[key][0] += 1
        try:
            yield
        finally:
            _HELD[key][0] -= 1
        return
    made = _make_parent(key)
    f = _acquire(key, lock_path(key))
    _HELD[key] = [1, f]
    try:
        yield
    finally:
        del _HELD[key]
        lock_path(key).unlink(missing_ok=True)  # still holding it: whoever opens the name next gets a new file
        f.close()
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: the output (or anything else) is in it


def _key(output: str | os.PathLike) -> Path:
    """One name per output: its parent's real path (symbolic links followed) and its own name."""
    path = Path(output).absolute()
    return Path(os.path.realpath(path.parent)) / path.name


def _check_name(output: Path) -> None:
    """Refuse a name too long for its hidden siblings (the file system's limit, 255 bytes on most)."""
    try:
        limit = os.pathconf(nearest_existing(output.parent), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    extra = len(f".{LONGEST_SIBLING}".encode())
    if len(output.name.encode()) + extra > limit:
        raise SvdkitError(
            f"the output name '{output.name[:40]}...' is {len(output.name.encode())} bytes long, but svdkit keeps "
            f"hidden folders beside it (.NAME{LONGEST_SIBLING}) and this file system allows names of {limit} bytes: "
            f"shorten it to at most {limit - extra} bytes"
        )


def _make_parent(output: Path) -> list[Path]:
    """Make `output`'s missing ancestors (after proving a file can be created where they would go); the ones
    made, deepest first."""
    check_writable(output.parent)
    missing = [p for p in (output.parent, *output.parent.parents) if not p.exists()]
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SvdkitError(f"cannot create the folder of {output}: {e.strerror or e}: choose another output") from e
    return missing


def _acquire(output: Path, lock: Path) -> IO[str]:
    while True:
        try:
            f = open(lock, "a+")  # noqa: SIM115 - held until the output is written
        except OSError as e:
            raise SvdkitError(f"cannot write to {lock.parent}: {e.strerror or e}: choose another output") from e
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            f.close()
            raise SvdkitError(f"another svdkit process ({holder}) is writing {output}: wait for it") from None
        if _same_file(f, lock):  # not a file its last owner unlinked after we opened it
            break
        f.close()
    f.seek(0)
    f.truncate()
    me = owner()
    f.write(json.dumps({"pid": me["pid"], "host": me["host"]}))
    f.flush()
    return f


def _same_file(f: IO[str], lock: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(lock))
    except FileNotFoundError:
        return False


def _holder(f: IO[str]) -> str:
    """'pid N on HOST' from the lock file's content ('pid unknown' while the owner is still writing it)."""
    f.seek(0)
    try:
        held = json.loads(f.read() or "{}")
        return f"pid {int(held['pid'])} on {held['host']}"
    except (ValueError, KeyError, TypeError):
        return "pid unknown"
