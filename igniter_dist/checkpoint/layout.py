"""What a checkpoint folder looks like: `step_<N>` names and the JSON manifest that commits it.

    <root>/step_0000001200/__0_0.distcp ... .metadata   (written by DCP, every rank its share)
    <root>/step_0000001200/manifest.json                (written last by rank 0: the commit marker)
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import time
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, DamagedCheckpoint

STEP_PREFIX = "step_"
STEP_DIGITS = 10
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"
FORMAT = "igniter-dist-checkpoint"
FORMAT_VERSION = 1
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")
RESERVED = ("format", "format_version", "step", "time", "unix_time", "world_size", "versions",
            "metrics", "files")


def step_dirname(step: int) -> str:
    """`step_0000001200`: zero-padded so names sort like numbers."""
    if step < 0:
        raise ValueError(f"checkpoint steps are non-negative, got {step}")
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step(name: str) -> int | None:
    """The step of a `step_<N>` folder name, None for anything else."""
    m = _STEP_RE.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def split_step_url(url: str) -> tuple[str, int] | None:
    """`(root, step)` of a step folder's URL (`runs/a/checkpoints/step_0000000270`), None for any other name."""
    root, _, name = url.rstrip("/").rpartition("/")
    step = parse_step(name)
    return None if step is None else (root or ".", step)


@dataclass(frozen=True)
class Folder:
    """One `step_<N>` folder as listed: its files (name -> size) and whether it is committed."""

    step: int
    name: str
    files: dict[str, int]

    @property
    def committed(self) -> bool:
        return MANIFEST in self.files

    @property
    def size(self) -> int:
        return sum(self.files.values())


def group_folders(listing: dict[str, int]) -> dict[int, Folder]:
    """Group a recursive listing (relative path -> size) into step folders, by step."""
    files: dict[str, dict[str, int]] = {}
    for rel, size in listing.items():
        parts = rel.split("/")
        if len(parts) >= 2 and parse_step(parts[0]) is not None:
            files.setdefault(parts[0], {})["/".join(parts[1:])] = size
    folders: dict[int, Folder] = {}
    for name, contents in files.items():
        step = parse_step(name)
        assert step is not None
        prior = folders.get(step)
        # Two spellings of one step (another padding): the committed one wins.
        if prior is None or (not prior.committed and MANIFEST in contents):
            folders[step] = Folder(step, name, contents)
    return folders


def versions() -> dict[str, str]:
    import fsspec
    import torch

    try:
        ig_version = importlib.metadata.version("igniter-dist")
    except importlib.metadata.PackageNotFoundError:
        ig_version = "unknown"
    return {"igniter_dist": ig_version, "torch": torch.__version__, "fsspec": fsspec.__version__,
            "python": platform.python_version()}


def build_manifest(step: int, world_size: int, files: dict[str, int], metrics: dict[str, float] | None,
                   extras: dict[str, Any]) -> dict[str, Any]:
    """The commit marker's content: the caller's extras, then the facts this package owns."""
    clash = sorted(set(extras) & set(RESERVED))
    if clash:
        raise ValueError(f"manifest extras may not use the reserved keys {clash}")
    now = time.time()
    return {
        **extras,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "unix_time": now,
        "world_size": world_size,
        "versions": versions(),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "files": [{"name": n, "size": s} for n, s in sorted(files.items())],
    }


def file_problems(manifest: dict[str, Any], present: dict[str, int]) -> list[str]:
    """What is wrong with a committed folder's files (name -> size, listed fresh) against the sizes its
    manifest recorded; empty when every file is there with its size."""
    recorded = {f.get("name"): f.get("size") for f in manifest.get("files") or [] if isinstance(f, dict)}
    problems = []
    for name, size in sorted((str(n), s) for n, s in recorded.items()):
        if name not in present:
            problems.append(f"{name} is missing")
        elif present[name] != size:
            problems.append(f"{name} has {present[name]} bytes where the manifest recorded {size}")
    if DCP_METADATA not in recorded:
        problems.append(f"the manifest lists no {DCP_METADATA}")
    return problems


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False, allow_nan=True) + "\n").encode()


def decode_manifest(data: bytes, url: str) -> dict[str, Any]:
    """Parse a manifest: DamagedCheckpoint for anything that is not one of ours, CheckpointError for a
    newer format."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpoint(f"The manifest {url} is not valid JSON ({e}); the checkpoint is damaged.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DamagedCheckpoint(f"{url} is not an igniter-dist checkpoint manifest; the checkpoint is damaged.")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{url} was written by a newer igniter-dist (format {manifest.get('format_version')}); upgrade to load it."
        )
    return manifest
