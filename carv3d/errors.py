"""Errors a user can cause.

Every exception here derives from :class:`UserError`. The CLI prints its message without a
traceback and exits with code 2; anything else is a bug and propagates normally.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""

    exit_code = 2


class ConfigError(UserError):
    """An unknown key, a wrong type or an invalid value in the configuration."""


class PromptError(UserError):
    """An empty prompt, or a prompt the chosen teacher cannot understand."""


class TeacherWeightsError(UserError):
    """Teacher weights that cannot be found or loaded."""


class RunDirError(UserError):
    """A run directory that does not exist, is not a run, or must not be overwritten."""


class RunLockedError(RunDirError):
    """A run directory that another process is training in right now."""


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated or not a carv3d checkpoint."""


class OutputPathError(UserError):
    """An output path that cannot be written or already exists."""


class DiskFullError(OutputPathError):
    """A write that ran out of disk space (or quota, or allowed file size); the message says what is intact."""


class BackendUnavailableError(UserError):
    """An explicitly requested optional backend (tinycudann, nerfacc's CUDA path) is missing."""


class TrainingDivergedError(UserError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""
