"""Before the first step: the local folders a run writes can be created and written.

A folder that cannot be written (a file in its place, a read-only folder, a path under a file)
would otherwise be found at the first save or at the end, after the training it was meant to keep.
An object-store checkpoint folder is listed instead (its bucket must exist and allow listing).
"""

from __future__ import annotations

import os
import uuid

from ..errors import CheckpointError, ConfigError, IgniterError
from ..runtime import Runtime
from .agreement import agree
from .storage import Storage


def unwritable(path: str) -> str | None:
    """Why the local folder `path` cannot be created, or a file written in it and removed; None if it can."""
    probe = os.path.join(path, f".igniter-dist-probe-{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe")
        os.remove(probe)
    except FileExistsError:
        return "it is a file, not a folder"
    except NotADirectoryError:
        return "part of it is a file, not a folder"
    except PermissionError:
        return "permission denied"
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def check_writable(runtime: Runtime, *, checkpoint_dir: str | None, output_dir: str | None,
                   model_dir: str | None) -> None:
    """Collective: probe the folders the run writes; on failure every rank raises one sentence naming
    the flag, the path and the reason (CheckpointError for the checkpoint folder, which every rank
    writes its shard to and probes, rank 0 alone listing it on an object store; ConfigError for the
    output and model folders, which rank 0 alone writes and probes)."""
    error: IgniterError | None = None
    probes = [("--checkpoint-dir", checkpoint_dir, CheckpointError, True),
              ("--output-dir", output_dir, ConfigError, runtime.is_main),
              ("--model-dir", model_dir, ConfigError, runtime.is_main)]
    for flag, location, kind, mine in probes:
        if location and mine:
            error = _problem(flag, location, kind, list_remote=runtime.is_main and flag == "--checkpoint-dir")
            if error is not None:
                break
    agree(runtime.all_gather_object, error)


def _problem(flag: str, location: str, kind: type[IgniterError], *, list_remote: bool) -> IgniterError | None:
    """Why the run could not write to `location` (given as `flag`), or None."""
    try:
        storage = Storage(location)
    except CheckpointError as e:
        return kind(str(e))
    if not storage.is_local:
        return _unlistable(storage) if list_remote else None
    reason = unwritable(storage.root)
    if reason is None:
        return None
    return kind(f"{flag} {location} cannot be written ({reason}); pass a folder this process can create and write.")


def _unlistable(storage: Storage) -> CheckpointError | None:
    """The error listing an object-store checkpoint folder gives (no such bucket, access denied), if any."""
    try:
        storage.find()
    except Exception as e:
        return storage.error("list checkpoints in", e)
    return None
