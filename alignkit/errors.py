"""The errors alignkit raises on purpose. The CLI prints any :class:`AlignkitError` (and ``ValueError`` /
``FileNotFoundError`` from config and data checks) as one line without a traceback, and exits non-zero;
``--debug`` shows the traceback."""

from __future__ import annotations

__all__ = ["AlignkitError", "TrainingDiverged", "CheckpointError", "DiskFullError", "RewardFailedError"]


class AlignkitError(RuntimeError):
    """Base of alignkit's run-time errors: a run that cannot go on, with the cause in the message."""


class TrainingDiverged(AlignkitError):
    """More non-finite losses or gradient norms in a row than ``max_nonfinite_steps`` allows."""


class CheckpointError(AlignkitError):
    """A checkpoint that cannot be used (corrupt, incomplete, non-finite weights), named by path."""


class DiskFullError(AlignkitError):
    """Not enough free disk space for a checkpoint (before training, or when a save failed)."""


class RewardFailedError(AlignkitError):
    """A reward function failed on every sample for too many steps in a row (its traceback is attached)."""
