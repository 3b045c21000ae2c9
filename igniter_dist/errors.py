"""The exceptions a user sees, each a sentence naming the problem, the value and the fix; the exit-code tables."""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class ExitCode:
    """One row of an exit-code table: `--help` shows `code` and `meaning`; the docs add `detail` and `fix`."""

    code: str
    meaning: str
    detail: str = ""  # Markdown, for docs/reference/exit-codes.md
    fix: str = ""


# The one table of a training script's exit codes: `--help` prints it, docs/reference/exit-codes.md renders it.
SCRIPT_EXIT_CODES = (
    ExitCode("0", "training (or your main) finished"),
    ExitCode("1", "an unexpected exception (its traceback is printed)", "",
             "a bug in the script or the environment; read the traceback"),
    ExitCode(str(ConfigError.exit_code), "bad input (one sentence names it)",
             "a flag, a metric spec, a step output, a setting (`ConfigError`, `StepOutputError`), an "
             "`--output-dir` or `--model-dir` that cannot be written, a `--keep-best` metric that is never "
             "logged, a keyword `igniter_main` no longer takes; one sentence, no traceback",
             "fix what the sentence names"),
    ExitCode(str(CheckpointError.exit_code), "a checkpoint could not be written, found or loaded",
             "`CheckpointError`: no such bucket, access denied, a `--checkpoint-dir` that cannot be written, a "
             "`--resume-from` or `--init-from` that is not a committed checkpoint or model file, a checkpoint "
             "that does not match the model, every committed checkpoint damaged",
             "fix the storage or the URL; the previous checkpoint is intact"),
    ExitCode("128 + N", "stopped by signal N after saving the current step: 130 SIGINT (Ctrl-C), 143 SIGTERM, "
             "129 SIGHUP", "", "run the same command again to resume"),
)

# The `igniter-dist` command's exit codes.
COMMAND_EXIT_CODES = (
    ExitCode("0", "done", "`checkpoints verify`: the checkpoint is whole; `launch sagemaker`: the job completed, "
             "or was created with `--wait false`"),
    ExitCode("1", "a check failed or a job did not complete",
             "`checkpoints verify` found problems; `launch sagemaker` followed a job that failed or was stopped"),
    ExitCode(str(ConfigError.exit_code), "a usage error or bad option",
             "`sagemaker-entrypoint`: also a job it cannot start, e.g. a master host name that does not resolve "
             "([SageMaker](../sagemaker.md#when-the-master-host-does-not-resolve))"),
    ExitCode(str(CheckpointError.exit_code), "a checkpoint could not be found or read", "`checkpoints` commands"),
    ExitCode("130", "you stopped following a job with Ctrl-C (the job goes on)", "`launch sagemaker`"),
)
