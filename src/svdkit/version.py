"""svdkit's version, from the installed package metadata."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("svdkit")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"
