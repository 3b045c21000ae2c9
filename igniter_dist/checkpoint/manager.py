"""The checkpoint manager: the commit protocol, "latest", retention and async saves.

A save writes a fresh `step_<N>` folder with DCP (every rank its share), then rank 0 writes the
manifest, the commit marker, after every rank finished. "Latest" is the highest committed step.
Retention runs on rank 0 after a commit and deletes the manifest before the files, so a crash
never leaves a half-deleted folder that looks committed.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointError, ConfigError, IgniterError
from ..runtime import Runtime
from . import layout, staging, state as state_mod
from .retention import choose_kept, parse_keep_best
from .safe_load import SafeLoadPlanner, load_metadata, safe_reader
from .storage import Storage, fsspec_io, root_cause

log = logging.getLogger("igniter_dist.checkpoint")
OnError = Literal["stop", "warn"]


@dataclass(frozen=True)
class LoadResult:
    """What `CheckpointManager.load` found besides the tensors it loaded in place."""

    manifest: dict[str, Any]
    per_rank: dict[str, Any] | None  # None when the saving run had no rank with this number
    saved_world_size: int
    url: str


@contextlib.contextmanager
def _without_zip_checksums() -> Iterator[None]:
    """DCP stores each tensor as a `torch.save` zip record, whose CRC32 costs about 23 ms per 100 MB
    here (a tenth of a local save); `torch.load` never checks it, so it is not computed while DCP
    writes. The manifest still records every file's size."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class CheckpointManager:
    """Sharded checkpoints of one run under one folder or URL."""

    def __init__(self, url: str, runtime: Runtime, *, n_saved: int = 2, keep_best: str | None = None,
                 async_save: bool = False, on_error: OnError = "stop"):
        """Collective when `async_save` and distributed: every rank creates the saver's gloo group."""
        if not isinstance(n_saved, int) or n_saved < 1:
            raise ConfigError(f"--n-saved must be a positive integer, got {n_saved!r}.")
        if on_error not in ("stop", "warn"):
            raise ConfigError(f"--on-checkpoint-error must be stop or warn, got {on_error!r}.")
        self.runtime = runtime
        self.storage = Storage(url)
        self.n_saved = n_saved
        self.keep_best = parse_keep_best(keep_best)
        self.async_save = async_save
        self.on_error: OnError = on_error
        # Background writes run their collectives on their own gloo group, so they never interleave
        # with the training loop's collectives on the default group.
        self._group = dist.new_group(backend="gloo") if async_save and runtime.distributed else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="igniter-checkpoint") if async_save else None
        self._pending: Future[str | None] | None = None
        self._stager = staging.Stager() if async_save else None
        # Rank 0 deletes what retention lets go in the background, off the save's critical path;
        # the next save, listing or load waits for it first.
        self._deleter = ThreadPoolExecutor(1, thread_name_prefix="igniter-retention") if runtime.is_main else None
        self._retention: Future[None] | None = None
        self._metrics: dict[str, dict[str, float]] = {}  # rank 0: manifest metrics by folder name

    @property
    def url(self) -> str:
        return self.storage.url

    def url_of(self, step: int) -> str:
        return self.storage.url_of(layout.step_dirname(step))

    # ---- latest -------------------------------------------------------------------------------

    def latest(self) -> int | None:
        """Collective: the highest committed step (rank 0 lists fresh, then broadcasts), None if none."""
        self.wait()
        found: tuple[int | None, str | None] = (None, None)
        if self.runtime.is_main:
            try:
                committed = [s for s, f in self._folders().items() if f.committed]
                found = (max(committed) if committed else None, None)
            except Exception as e:
                found = (None, str(self.storage.error("list checkpoints in", e)))
        step, error = self.runtime.broadcast_object(found)
        if error:
            raise CheckpointError(error)
        return step

    # ---- save ---------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], *, per_rank: dict[str, Any],
             manifest: dict[str, Any], metrics: dict[str, float] | None = None) -> bool:
        """Collective: save `state` as step `step` and commit it.

        Returns True once committed (async: once started; its outcome is reported by the next
        `save` or `wait`). On failure, `on_error="stop"` raises CheckpointError on every rank;
        `"warn"` logs on rank 0 and returns False. A failed save is never committed.
        """
        self.wait()
        entries = state_mod.classify(state)  # ConfigError, the same on every rank: a bug, not an outage
        sd, writer, error, config_error = self._build(step, entries, per_rank)
        shared = staging.shared_tensors(sd) if self._stager is not None else {}
        gathered = self.runtime.all_gather_object((error, config_error, staging.fingerprint(shared)))
        config_errors = [c for _, c, _ in gathered if c]
        if config_errors:
            raise ConfigError(config_errors[0])  # a bug in what is saved: warn mode would repeat it forever
        errors = [err for err, _, _ in gathered if err]
        if errors:
            return self._failed(errors[0])
        job = (step, sd, writer, dict(manifest), dict(metrics or {}))
        if self._executor is not None and self._stager is not None:
            # The only part of an async save the loop waits for: copying this rank's share.
            same_everywhere = len({fp for _, _, fp in gathered}) == 1
            owner = staging.owners(shared, self.runtime.world_size) if same_everywhere else {}
            skip = {path for path, rank in owner.items() if rank != self.runtime.rank}
            job = (step, self._stager.stage(sd, skip), *job[2:])
            self._pending = self._executor.submit(self._write, *job)
            return True
        error = self._write(*job)
        return self._failed(error) if error else True

    def wait(self) -> None:
        """Wait for the save in flight and rank 0's deletions, if any; raise or warn (per `on_error`)
        if the save failed."""
        pending, self._pending = self._pending, None
        error = None
        if pending is not None:
            try:
                error = pending.result()
            except BaseException as e:  # the background thread's own collectives failed
                error = str(self.storage.error("finish the background save to", e))
        retention, self._retention = self._retention, None  # started by the save just waited for
        if retention is not None:
            retention.result()  # never raises: `_retain` logs its own failures
        if error:
            self._failed(error)

    def close(self) -> None:
        """Wait for the save in flight and stop the background writer."""
        try:
            self.wait()
        finally:
            for executor in (self._executor, self._deleter):
                if executor is not None:
                    executor.shutdown(wait=True)
            self._executor = self._deleter = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self, step: int, entries: list[state_mod.Entry], per_rank: dict[str, Any]
               ) -> tuple[dict[str, Any], Any, str | None, str | None]:
        """This rank's state dict and DCP writer; or the storage error, or the config error (a value
        that would not load back)."""
        url = self.url_of(step)
        try:
            sd = state_mod.to_save(entries, per_rank, self.runtime.rank)
            return sd, self._writer(url), None, state_mod.unloadable(sd)
        except IgniterError as e:
            return {}, None, str(e), None
        except Exception as e:
            return {}, None, str(self.storage.error(f"prepare step {step} for", e, url)), None

    def _writer(self, url: str) -> Any:
        FsspecWriter, _ = fsspec_io()
        # fsync each file on local disks; object stores have no fsync (s3fs would sync the host).
        # On object stores each file uploads its parts one after another, so four files per rank
        # upload concurrently (measured 1.7-3.2 s instead of 3.9-4.3 s for 200 MB on moto).
        return FsspecWriter(url, single_file_per_rank=True, sync_files=self.storage.is_local,
                            thread_count=1 if self.storage.is_local else 4)

    def _prepare_folder(self, folder: str) -> str:
        """Rank 0: 'exists' when the step is already committed; else clear a dead run's leftovers."""
        files = self.storage.find(folder)
        if layout.MANIFEST in files:
            return "exists"
        if files:
            log.warning("Removing the uncommitted leftovers of an earlier run in %s.", self.storage.url_of(folder))
            self.storage.rm_tree(folder)
        self.storage.makedirs(folder)
        return "write"

    def _write(self, step: int, sd: dict[str, Any], writer: Any, extras: dict[str, Any],
               metrics: dict[str, float]) -> str | None:
        """Collective on the saver's group: rank 0 prepares the folder, DCP write, commit by rank 0,
        agreement, retention in the background; the error or None."""
        folder = layout.step_dirname(step)
        url = self.storage.url_of(folder)
        error: str | None = None
        plan = "write"
        if self.runtime.is_main:
            try:
                plan = self._prepare_folder(folder)
            except Exception as e:
                error = str(self.storage.error(f"prepare the folder for step {step} at", e, url))
        gathered = self._gather((error, plan))
        errors = [e for e, _ in gathered if e]
        if errors:
            return errors[0]
        if gathered[0][1] == "exists":
            if self.runtime.is_main:
                log.warning("Checkpoint %s is already committed; keeping it and skipping this save.", url)
            return None
        try:
            with state_mod.quiet_single_process(self.runtime.distributed), _without_zip_checksums():
                dcp.save(sd, storage_writer=writer, process_group=self._group,
                         no_dist=not self.runtime.distributed)
        except (Exception, CheckpointException) as e:
            error = str(self._cause_error(f"save step {step} to", e, url))
        if error is None and self.runtime.is_main:
            try:
                self._commit(folder, step, extras, metrics)
            except Exception as e:
                error = str(self.storage.error(f"commit step {step} at", e, url))
        errors = [e for e in self._gather(error) if e]
        if errors:
            return errors[0]  # type: ignore[no-any-return]
        if self._deleter is not None:
            self._retention = self._deleter.submit(self._retain)
        return None

    def _commit(self, folder: str, step: int, extras: dict[str, Any], metrics: dict[str, float]) -> None:
        """Rank 0, after every rank finished: write the manifest, last, as the commit marker."""
        files = self.storage.find(folder)
        if layout.DCP_METADATA not in files:
            raise FileNotFoundError(f"DCP wrote no {layout.DCP_METADATA} in {self.storage.url_of(folder)}")
        files = {n: s for n, s in files.items() if n != layout.MANIFEST and ".tmp" not in n}
        manifest = layout.build_manifest(step, self.runtime.world_size, files, metrics, extras)
        self.storage.write_atomic(layout.encode_manifest(manifest), folder, layout.MANIFEST)
        self._metrics[folder] = manifest["metrics"]

    def _gather(self, value: Any) -> list[Any]:
        """Collective on the saver's group (the default one for sync saves)."""
        if self._group is None:
            return self.runtime.all_gather_object(value)
        out: list[Any] = [None] * self.runtime.world_size
        dist.all_gather_object(out, value, group=self._group)
        return out

    def _failed(self, message: str) -> bool:
        if self.on_error == "stop":
            raise CheckpointError(message)
        if self.runtime.is_main:
            log.warning("%s Training goes on; the next save tries again.", message)
        return False

    # ---- retention ----------------------------------------------------------------------------

    def _folders(self) -> dict[int, layout.Folder]:
        return layout.group_folders(self.storage.find())

    def _retain(self) -> None:
        """Rank 0, after a commit: delete what retention lets go and older uncommitted leftovers.

        Never fails the save: a deletion that fails is retried at the next commit.
        """
        try:
            folders = self._folders()
            committed = {s: f for s, f in folders.items() if f.committed}
            if not committed:
                return
            metrics = {s: self._manifest_metrics(f) for s, f in committed.items()}
            kept = choose_kept(metrics, self.n_saved, self.keep_best)
            newest = max(committed)
            for step, f in sorted(folders.items()):
                if f.committed and step not in kept:
                    self.storage.rm(f.name, layout.MANIFEST)  # uncommit first, then delete
                    self.storage.rm_tree(f.name)
                    self._metrics.pop(f.name, None)
                elif not f.committed and step < newest:
                    self.storage.rm_tree(f.name)  # a failed save or a dead run's folder
        except Exception as e:
            log.warning("Retention in %s failed (%s); it runs again after the next save.", self.storage.url,
                        self.storage.describe(e))

    def _manifest_metrics(self, folder: layout.Folder) -> dict[str, float]:
        if self.keep_best is None:
            return {}
        if folder.name not in self._metrics:
            data = self.storage.read_bytes(folder.name, layout.MANIFEST)
            metrics = layout.decode_manifest(data, self.storage.url_of(folder.name, layout.MANIFEST)).get("metrics")
            self._metrics[folder.name] = metrics if isinstance(metrics, dict) else {}
        return self._metrics[folder.name]

    # ---- load ---------------------------------------------------------------------------------

    def load(self, step: int, state: dict[str, Any]) -> LoadResult:
        """Collective: load committed step `step` in place into the objects of `state`."""
        self.wait()
        entries = state_mod.classify(state)
        folder = layout.step_dirname(step)
        url = self.storage.url_of(folder)
        found: tuple[dict[str, Any], str, str | None] = ({}, folder, None)
        if self.runtime.is_main:
            found = self._read_manifest(step)
        manifest, folder, error = self.runtime.broadcast_object(found)
        if error:
            raise CheckpointError(error)
        url = self.storage.url_of(folder)

        error = None
        try:
            metadata = load_metadata(io.BytesIO(self.storage.read_bytes(folder, layout.DCP_METADATA)), url)
            template = state_mod.load_template(entries, metadata, self.runtime.rank, url)
        except IgniterError as e:
            error = str(e)
        except Exception as e:
            error = str(self.storage.error("read the metadata of", e, url))
        self._agree(error)

        try:
            with state_mod.quiet_single_process(self.runtime.distributed):
                dcp.load(template, storage_reader=safe_reader(url), planner=SafeLoadPlanner(),
                         no_dist=not self.runtime.distributed)
        except (Exception, CheckpointException) as e:
            raise self._cause_error("load", e, url) from None  # DCP raised it on every rank
        error = None
        per_rank: dict[str, Any] | None = None
        try:
            per_rank = state_mod.apply(entries, template, metadata, self.runtime.rank)
        except IgniterError as e:
            error = str(e)
        except Exception as e:
            error = f"Could not apply the state loaded from {url}: {type(e).__name__}: {e}."
        self._agree(error)
        saved_world_size = int(manifest.get("world_size") or state_mod.saved_world_size(metadata))
        return LoadResult(manifest=manifest, per_rank=per_rank, saved_world_size=saved_world_size, url=url)

    def _read_manifest(self, step: int) -> tuple[dict[str, Any], str, str | None]:
        """Rank 0: (manifest, folder name, None) for committed `step` (any padding), or ({}, "", error)."""
        try:
            folders = self._folders()
        except Exception as e:
            return {}, "", str(self.storage.error("list checkpoints in", e))
        f = folders.get(step)
        if f is None or not f.committed:
            committed = sorted(s for s, g in folders.items() if g.committed)
            have = f"its committed steps are {committed[-5:]}" if committed else "it has no committed checkpoint"
            return {}, "", f"No committed checkpoint for step {step} in {self.storage.url}; {have}."
        url = self.storage.url_of(f.name, layout.MANIFEST)
        try:
            return layout.decode_manifest(self.storage.read_bytes(f.name, layout.MANIFEST), url), f.name, None
        except IgniterError as e:
            return {}, "", str(e)
        except Exception as e:
            return {}, "", str(self.storage.error("read", e, url))

    def _agree(self, error: str | None) -> None:
        """Collective: raise the first rank's error on every rank, so none waits in a later collective."""
        errors = [e for e in self.runtime.all_gather_object(error) if e]
        if errors:
            raise CheckpointError(errors[0])

    def _cause_error(self, action: str, exc: BaseException, url: str) -> CheckpointError:
        cause = root_cause(exc)
        if isinstance(cause, IgniterError):
            return CheckpointError(str(cause))
        return self.storage.error(action, cause, url)
