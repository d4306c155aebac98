"""The errors of using a finished run: each names the path it is about and what is wrong with it, and
subclasses ValueError, so the command line reports them as bad input (exit status 2)."""
from __future__ import annotations

from typing import Optional


class InferenceError(ValueError):
    """A run folder, an input or an export that cannot be used; `path` is the file or folder at fault."""

    def __init__(self, message: str, path: Optional[str] = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class RunFolderError(InferenceError):
    """The folder is not a loadable run: result.json or model.pt missing or unreadable, or its network
    cannot be rebuilt from what result.json records."""


class WeightsMismatchError(RunFolderError):
    """model.pt does not hold the network result.json describes (other keys, shapes or classes)."""


class ClassMismatchError(InferenceError):
    """A test set whose classes are not the run's: its accuracy would compare unrelated labels."""


class InputError(InferenceError):
    """Images to predict that cannot be read: a missing file, a folder without images, a wrong array."""


class ExportError(InferenceError):
    """An export that failed, or whose output differs from the eager network's beyond the tolerance."""


class ExportDependencyError(ExportError, ImportError):
    """An export format whose packages are not installed (also an ImportError, for callers that check)."""
