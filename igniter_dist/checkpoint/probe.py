"""Before the first step: the local folders a run writes can be created and written.

A folder that cannot be written (a file in its place, a read-only folder, a path under a file)
would otherwise be found at the first save or at the end, after the training it was meant to keep.
Object stores are checked by the first listing of the checkpoint folder instead.
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
    """Collective: probe the local folders the run writes; on failure every rank raises one sentence
    naming the flag, the path and the reason (CheckpointError for the checkpoint folder, which every
    rank writes its shard to and probes; ConfigError for the output and model folders, which rank 0
    alone writes and probes)."""
    error: IgniterError | None = None
    probes = [("--checkpoint-dir", checkpoint_dir, CheckpointError, True),
              ("--output-dir", output_dir, ConfigError, runtime.is_main),
              ("--model-dir", model_dir, ConfigError, runtime.is_main)]
    for flag, location, kind, mine in probes:
        if not location or not mine:
            continue
        try:
            storage = Storage(location)
        except CheckpointError as e:
            error = kind(str(e))
            break
        reason = unwritable(storage.root) if storage.is_local else None
        if reason is not None:
            error = kind(f"{flag} {location} cannot be written ({reason}); pass a folder this process can "
                         "create and write.")
            break
    agree(runtime.all_gather_object, error)
