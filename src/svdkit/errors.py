"""The one exception type svdkit raises for bad input: the CLI prints its message and exits 2."""

__all__ = ["NotStreamable", "SvdkitError", "SvdkitWarning"]


class SvdkitError(Exception):
    """A user-facing error: the message says what is wrong and what to do about it."""


class NotStreamable(SvdkitError):
    """A compression that cannot stream layer by layer from the checkpoint (the message says why); the
    command line then loads the model whole."""


class SvdkitWarning(UserWarning):
    """What svdkit warns about (the command line shows these always, other libraries' only with --verbose)."""
