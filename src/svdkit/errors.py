"""The one exception type svdkit raises for bad input: the CLI prints its message and exits 2."""

__all__ = ["SvdkitError"]


class SvdkitError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it."""
