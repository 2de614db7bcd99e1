"""bodyage: which parts of the body does a deep age regressor use on whole-body MRI.

The package is light on import: torch, captum and TotalSegmentator are imported inside
the functions that need them, so ``import bodyage`` (and ``bodyage --help``) is instant
and the statistics layer (:mod:`analysis`) can use the table-level modules without the
deep-learning stack.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bodyage")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
