"""The one exception type for user mistakes: a sentence naming the problem, the value and the fix."""

from __future__ import annotations


class IgniterError(Exception):
    """A user-facing error; `igniter_main` prints its message alone and exits non-zero."""

    exit_code: int = 2


class ConfigError(IgniterError):
    """A bad flag, argument or spec, found before any work starts."""


class StepOutputError(IgniterError):
    """A step function returned something the engine cannot use."""


class CheckpointError(IgniterError):
    """A checkpoint could not be written, found or loaded."""

    exit_code = 3


class DamagedCheckpoint(CheckpointError):
    """A committed checkpoint whose files are missing, of another size than recorded, or unreadable."""
