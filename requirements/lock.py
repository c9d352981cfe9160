"""The lock of the tested environment: write it from a venv, check a venv against it, or show the drift.

    python requirements/lock.py write   # print a lock of the running venv (make lock writes lock.txt with it)
    python requirements/lock.py check   # exit 1 unless the running venv is exactly the lock (make install runs it)
    python requirements/lock.py diff    # list what differs from the lock (make test-latest runs it), exit 0

Every installed distribution but svdkit itself is locked, pip and setuptools included; torch's local
build tag (+cpu) is dropped, so the lock names the release and the Makefile's pin picks the CPU build.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).with_name("lock.txt")
SELF = "svdkit"


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Canonical name -> version (without a local build tag) of every distribution in the running venv."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:  # a broken install can leave a distribution without metadata
            found[_name(name)] = dist.version.split("+")[0]
    found.pop(SELF, None)
    return found


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    return pins


def differences(have: dict[str, str], want: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(set(have) | set(want)):
        if name not in want:
            lines.append(f"{name} {have[name]}: not in the lock")
        elif name not in have:
            lines.append(f"{name}: locked at {want[name]}, not installed")
        elif have[name] != want[name]:
            lines.append(f"{name} {have[name]} (lock {want[name]})")
    return lines


def main(argv: list[str]) -> int:
    if argv == ["write"]:
        head = "# The tested environment, which make install installs. Refresh: make lock, then make test.\n"
        sys.stdout.write(head + "".join(f"{n}=={v}\n" for n, v in sorted(installed().items())))
        return 0
    if argv in (["check"], ["diff"]):
        diff = differences(installed(), locked())
        if argv == ["diff"]:
            print("newest allowed versions against the lock:" if diff else "the newest allowed versions are the lock's")
            print("".join(f"  {line}\n" for line in diff), end="")
            return 0
        if diff:
            print(f"this venv is not the lock ({LOCK}):", *diff, sep="\n  ", file=sys.stderr)
            return 1
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
