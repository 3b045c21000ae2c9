"""The checkpoint manager: the commit protocol, "latest", retention, async saves and damaged steps.

A save writes a fresh `step_<N>` folder with DCP (every rank its share), then rank 0 writes the
manifest, the commit marker, after every rank finished. "Latest" is the highest committed step;
resuming loads the newest one whose files are whole, reporting and keeping any damaged one.
Retention runs on rank 0 after a commit and deletes the manifest before the files, so a crash
never leaves a half-deleted folder that looks committed.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from ..errors import CheckpointError, ConfigError, DamagedCheckpoint, IgniterError
from ..runtime import Runtime
from . import layout, staging
from . import state as state_mod
from .agreement import agree
from .retention import choose_kept, parse_keep_best, unlogged_metric
from .safe_load import SafeLoadPlanner, load_metadata, safe_reader
from .storage import Storage, fsspec_io, root_cause
from .writeback import start_writeback_early

log = logging.getLogger("igniter_dist.checkpoint")
OnError = Literal["stop", "warn"]
Plan = Literal["write", "exists"]


@dataclass(frozen=True)
class LoadResult:
    """What `CheckpointManager.load` found besides the tensors it loaded in place."""

    step: int
    manifest: dict[str, Any]
    per_rank: dict[str, Any] | None  # None when the saving run had no rank with this number
    saved_world_size: int
    url: str


@dataclass(frozen=True)
class _SaveJob:
    """One save, ready to write: this rank's state dict (staged for a background write) and its writer."""

    step: int
    state_dict: dict[str, Any]
    writer: Any
    extras: dict[str, Any]
    metrics: dict[str, float]


@contextlib.contextmanager
def _without_zip_checksums() -> Iterator[None]:
    """DCP stores each tensor as a `torch.save` zip record, whose CRC32 costs about 23 ms per 100 MB
    here (a tenth of a local save) and which `torch.load` never checks; the manifest records every
    file's size instead. torch has one process-wide switch for it, so it is turned off only around a
    sync save, on the thread that called `save` and waits for it; background writes keep the CRC."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class CheckpointManager:
    """Sharded checkpoints of one run under one folder or URL."""

    def __init__(self, url: str, runtime: Runtime, *, n_saved: int = 2, keep_best: str | None = None,
                 async_save: bool = False, on_error: OnError = "stop", direct_read: bool = True):
        """Collective when `async_save` and distributed: every rank creates the saver's gloo group.

        `direct_read=False` loads every tensor through DCP's own reader instead of reading local
        files straight into the live tensors (see `direct_read.py`).
        """
        if not isinstance(n_saved, int) or n_saved < 1:
            raise ConfigError(f"--n-saved must be a positive integer, got {n_saved!r}.")
        if on_error not in ("stop", "warn"):
            raise ConfigError(f"--on-checkpoint-error must be stop or warn, got {on_error!r}.")
        self.runtime = runtime
        self.storage = Storage(url)
        self.n_saved = n_saved
        self.keep_best = parse_keep_best(keep_best)
        self.on_error: OnError = on_error
        self.direct_read = direct_read
        # Background writes run their collectives on their own gloo group, so they never interleave
        # with the training loop's collectives on the default group.
        self._group = dist.new_group(backend="gloo") if async_save and runtime.distributed else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="igniter-checkpoint") if async_save else None
        self._pending: Future[None] | None = None
        self._stager = staging.Stager() if async_save else None
        # Rank 0 deletes what retention lets go in the background, off the save's critical path;
        # the next save, listing or load waits for it first.
        self._deleter = ThreadPoolExecutor(1, thread_name_prefix="igniter-retention") if runtime.is_main else None
        self._retention: Future[None] | None = None
        self._manifests: dict[str, dict[str, Any]] = {}  # rank 0: manifests read or written, by folder name
        self._damaged: set[int] = set()  # steps a load found damaged: retention neither counts nor deletes them

    @property
    def url(self) -> str:
        return self.storage.url

    def url_of(self, step: int) -> str:
        return self.storage.url_of(layout.step_dirname(step))

    # ---- latest -------------------------------------------------------------------------------

    def latest(self) -> int | None:
        """Collective: the highest committed step (rank 0 lists fresh), None if none."""
        steps = self._committed_steps()
        return steps[-1] if steps else None

    def _committed_steps(self) -> list[int]:
        """Collective: every committed step, ascending, as rank 0 listed them."""
        self.wait()
        error: IgniterError | None = None
        steps: list[int] = []
        if self.runtime.is_main:
            try:
                steps = sorted(s for s, f in self._folders().items() if f.committed)
            except Exception as e:
                error = self._cause_error("list checkpoints in", e, self.storage.url)
        agreed: list[int] = self._agree(error, steps)[0]  # rank 0's
        return agreed

    # ---- save ---------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], *, per_rank: dict[str, Any],
             manifest: dict[str, Any], metrics: Mapping[str, float] | None = None) -> bool:
        """Collective: save `state` as step `step` and commit it.

        Returns True once committed (async: once started; its outcome is reported by the next
        `save` or `wait`). On failure, `on_error="stop"` raises CheckpointError on every rank;
        `"warn"` logs on rank 0 and returns False. A failed save is never committed. When an
        evaluation has logged metrics but not the `keep_best` one, the step is saved (retention
        skipped) and ConfigError is raised on every rank.
        """
        self.wait()
        entries = state_mod.classify(state)  # ConfigError, the same on every rank: a bug, not an outage
        error: IgniterError | None = None
        sd: dict[str, Any] = {}
        writer = None
        try:
            sd, writer = self._build(step, entries, per_rank)
        except IgniterError as e:
            error = e
        shared = staging.shared_tensors(sd) if self._stager is not None else {}
        unlogged = unlogged_metric(self.keep_best, metrics)
        try:
            gathered = self._agree(error, (staging.fingerprint(shared), unlogged))
        except CheckpointError as e:
            return self._failed(e)
        job = _SaveJob(step, sd, writer, dict(manifest), dict(metrics or {}))
        unlogged = gathered[0][1]  # rank 0's verdict, so that every rank acts alike
        if unlogged is not None:
            # Stop the run, but keep its work: this step is saved, and retention deletes nothing.
            self._write_now(job, retain=False)
            raise ConfigError(f"{unlogged} (step {step} was saved and no checkpoint was deleted).")
        if self._executor is not None and self._stager is not None:
            # The only part of an async save the loop waits for: copying this rank's share.
            same_everywhere = len({fp for fp, _ in gathered}) == 1
            owner = staging.owners(shared, self.runtime.world_size) if same_everywhere else {}
            skip = {path for path, rank in owner.items() if rank != self.runtime.rank}
            staged = _SaveJob(step, self._stager.stage(sd, skip), writer, job.extras, job.metrics)
            self._pending = self._executor.submit(self._write, staged, background=True)
            return True
        return self._write_now(job)

    def wait(self) -> None:
        """Wait for the save in flight and rank 0's deletions, if any; raise or warn (per `on_error`)
        if the save failed."""
        pending, self._pending = self._pending, None
        error: CheckpointError | None = None
        if pending is not None:
            try:
                pending.result()
            except CheckpointError as e:
                error = e
            except BaseException as e:  # the background thread's own collectives failed
                error = self.storage.error("finish the background save to", e)
        retention, self._retention = self._retention, None  # started by the save just waited for
        if retention is not None:
            retention.result()  # never raises: `_retain` logs its own failures
        if error is not None:
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
               ) -> tuple[dict[str, Any], Any]:
        """This rank's state dict and DCP writer; ConfigError for a value that would not load back."""
        url = self.url_of(step)
        try:
            sd = state_mod.to_save(entries, per_rank, self.runtime.rank)
            writer = self._writer(url)
        except Exception as e:
            raise self._cause_error(f"prepare step {step} for", e, url) from None
        problem = state_mod.unloadable(sd)
        if problem:
            raise ConfigError(problem)
        return sd, writer

    def _writer(self, url: str) -> Any:
        FsspecWriter, _ = fsspec_io()
        # fsync each file on local disks; object stores have no fsync (s3fs would sync the host).
        # On object stores each file uploads its parts one after another, so four files per rank
        # upload concurrently (measured 1.7-3.2 s instead of 3.9-4.3 s for 200 MB on moto).
        writer = FsspecWriter(url, single_file_per_rank=True, sync_files=self.storage.is_local,
                              thread_count=1 if self.storage.is_local else 4)
        return start_writeback_early(writer) if self.storage.is_local else writer

    def _write_now(self, job: _SaveJob, *, retain: bool = True) -> bool:
        """Collective: write `job` on this thread; True once committed, else per `on_error`."""
        try:
            self._write(job, retain=retain)
        except CheckpointError as e:
            return self._failed(e)
        return True

    def _write(self, job: _SaveJob, *, retain: bool = True, background: bool = False) -> None:
        """Collective on the saver's group: rank 0 prepares the folder, DCP write, commit by rank 0,
        agreement, retention in the background. Raises CheckpointError on every rank if it fails."""
        folder = layout.step_dirname(job.step)
        url = self.storage.url_of(folder)
        error: IgniterError | None = None
        plan: Plan = "write"
        if self.runtime.is_main:
            try:
                plan = self._prepare_folder(folder, job.step)
            except Exception as e:
                error = self._cause_error(f"prepare the folder for step {job.step} at", e, url)
        if self._agree(error, plan, saver=True)[0] != "write":
            return  # rank 0 said why
        error = None
        checksums = contextlib.nullcontext() if background else _without_zip_checksums()
        try:
            with state_mod.quiet_single_process(self.runtime.distributed), checksums:
                dcp.save(job.state_dict, storage_writer=job.writer, process_group=self._group,
                         no_dist=not self.runtime.distributed)
        except (Exception, CheckpointException) as e:
            error = self._cause_error(f"save step {job.step} to", e, url)
        if error is None and self.runtime.is_main:
            try:
                self._commit(folder, job)
            except Exception as e:
                error = self._cause_error(f"commit step {job.step} at", e, url)
        self._agree(error, saver=True)
        if retain and self._deleter is not None:
            self._retention = self._deleter.submit(self._retain)

    def _prepare_folder(self, folder: str, step: int) -> Plan:
        """Rank 0: 'exists' when the step is already committed (kept, even when damaged); else clear a
        dead run's leftovers."""
        files = self.storage.find(folder)
        url = self.storage.url_of(folder)
        if layout.MANIFEST in files:
            problems = self._problems(folder, files)
            if problems or step in self._damaged:
                log.warning("Checkpoint %s is committed but damaged (%s); it is left untouched, so step %d is not "
                            "saved again: move the folder away to let a later run save it.", url,
                            "; ".join(problems) or "it failed to load", step)
            else:
                log.warning("Checkpoint %s is already committed; keeping it and skipping this save.", url)
            return "exists"
        if files:
            log.warning("Removing the uncommitted leftovers of an earlier run in %s.", url)
            self.storage.rm_tree(folder)
        self.storage.makedirs(folder)
        return "write"

    def _commit(self, folder: str, job: _SaveJob) -> None:
        """Rank 0, after every rank finished: write the manifest, last, as the commit marker."""
        files = self.storage.find(folder)
        if layout.DCP_METADATA not in files:
            raise FileNotFoundError(f"DCP wrote no {layout.DCP_METADATA} in {self.storage.url_of(folder)}")
        files = {n: s for n, s in files.items() if n != layout.MANIFEST and ".tmp" not in n}
        manifest = layout.build_manifest(job.step, self.runtime.world_size, files, job.metrics, job.extras)
        self.storage.write_atomic(layout.encode_manifest(manifest), folder, layout.MANIFEST)
        self._manifests[folder] = manifest

    def _failed(self, error: CheckpointError) -> bool:
        if self.on_error == "stop":
            raise error
        if self.runtime.is_main:
            log.warning("%s Training goes on; the next save tries again.", error)
        return False

    # ---- agreement ----------------------------------------------------------------------------

    def _agree(self, error: IgniterError | None, value: Any = None, *, saver: bool = False) -> list[Any]:
        """Collective (on the saver's group with `saver`): every rank's `value`, or every rank raises
        the first rank's error."""
        return agree(self._gather_on_saver_group if saver else self.runtime.all_gather_object, error, value)

    def _gather_on_saver_group(self, value: Any) -> list[Any]:
        """Collective on the saver's group (the default one for sync saves)."""
        if self._group is None:
            return self.runtime.all_gather_object(value)
        out: list[Any] = [None] * self.runtime.world_size
        dist.all_gather_object(out, value, group=self._group)
        return out

    def _cause_error(self, action: str, exc: BaseException, url: str) -> CheckpointError:
        """The CheckpointError for `exc` (DCP's wrapper unwrapped), keeping ours as they are."""
        cause = root_cause(exc)
        if isinstance(cause, CheckpointError):
            return cause
        if isinstance(cause, IgniterError):
            return CheckpointError(str(cause))
        return self.storage.error(action, cause, url)

    # ---- retention ----------------------------------------------------------------------------

    def _folders(self) -> dict[int, layout.Folder]:
        return layout.group_folders(self.storage.find())

    def _retain(self) -> None:
        """Rank 0, after a commit: delete what retention lets go and older uncommitted leftovers.

        Damaged checkpoints neither count towards `n_saved` nor are deleted: the intact ones are
        what a resume can use, and the damaged ones are the user's to look at. Never fails the save:
        a deletion that fails is retried at the next commit.
        """
        try:
            folders = self._folders()
            intact = {s: f for s, f in folders.items()
                      if f.committed and s not in self._damaged and not self._problems(f.name, f.files)}
            if not intact:
                return
            metrics = {s: _metrics_of(self._manifest(f.name)) for s, f in intact.items()}
            kept = choose_kept(metrics, self.n_saved, self.keep_best)
            newest = max(intact)
            for step, f in sorted(folders.items()):
                if step in intact and step not in kept:
                    self.storage.rm(f.name, layout.MANIFEST)  # uncommit first, then delete
                    self.storage.rm_tree(f.name)
                    self._manifests.pop(f.name, None)
                elif not f.committed and step < newest:
                    self.storage.rm_tree(f.name)  # a failed save or a dead run's folder
        except Exception as e:
            log.warning("Retention in %s failed (%s); it runs again after the next save.", self.storage.url,
                        self.storage.describe(e))

    def _manifest(self, folder: str) -> dict[str, Any]:
        """Rank 0: the manifest of committed `folder`, read once; DamagedCheckpoint if it is not one."""
        if folder not in self._manifests:
            data = self.storage.read_bytes(folder, layout.MANIFEST)
            self._manifests[folder] = layout.decode_manifest(data, self.storage.url_of(folder, layout.MANIFEST))
        return self._manifests[folder]

    def _problems(self, folder: str, files: dict[str, int]) -> list[str]:
        """Rank 0: what is wrong with committed `folder`, listed as `files`; empty when it is whole."""
        try:
            return layout.file_problems(self._manifest(folder), files)
        except DamagedCheckpoint as e:
            return [str(e)]

    # ---- load ---------------------------------------------------------------------------------

    def load_latest(self, state: dict[str, Any]) -> LoadResult | None:
        """Collective: load the newest intact committed step in place into `state`; None if none is committed.

        A damaged step is reported on rank 0 (its URL and what is wrong), left on disk untouched and
        passed over for the one before it. CheckpointError when every committed step is damaged.
        """
        damaged: list[int] = []
        for step in reversed(self._committed_steps()):
            try:
                result = self.load(step, state)
            except DamagedCheckpoint as e:
                damaged.append(step)
                self._report(f"{e} It is left on disk untouched.")
                continue
            if damaged:
                self._report(f"Resuming from {result.url}, the newest intact checkpoint.")
            return result
        if damaged:
            names = ", ".join(layout.step_dirname(s) for s in sorted(damaged))
            raise CheckpointError(
                f"Every committed checkpoint in {self.url} is damaged ({names}); move those folders out of it "
                "(or choose another --checkpoint-dir) to start afresh, or pass --resume false."
            )
        return None

    def load(self, step: int, state: dict[str, Any], *, rank_state: bool = True) -> LoadResult:
        """Collective: load committed step `step` in place into the objects of `state`.

        DCP reads the keys of `state`'s objects only (and this rank's own state unless `rank_state` is
        False), so `{"model": model}` loads a model's weights alone out of a full checkpoint.
        Raises DamagedCheckpoint on every rank when its files are missing, of another size than its
        manifest recorded, or unreadable; CheckpointError when it cannot be found or reached, or does
        not match `state`.
        """
        try:
            return self._load(step, state, rank_state)
        except DamagedCheckpoint:
            self._damaged.add(step)
            raise

    def _load(self, step: int, state: dict[str, Any], rank_state: bool) -> LoadResult:
        """Collective: `load` itself (rank 0 checks the files, every rank reads the metadata and its share)."""
        self.wait()
        entries = state_mod.classify(state)
        error: IgniterError | None = None
        found: tuple[dict[str, Any], str] | None = None
        if self.runtime.is_main:
            try:
                found = self._committed(step)
            except IgniterError as e:
                error = e
        manifest, folder = self._agree(error, found)[0]
        url = self.storage.url_of(folder)

        error = None
        metadata: Metadata | None = None
        template: dict[str, Any] = {}
        try:
            metadata = self._metadata(folder)
            template = state_mod.load_template(entries, metadata, self.runtime.rank, url, rank_state=rank_state)
        except IgniterError as e:
            error = e
        self._agree(error)
        assert metadata is not None

        try:
            # What a rank reads follows from the metadata alone (DCP's global load plan changes no
            # rank's plan), so every rank loads as one process and one agreement replaces DCP's plan
            # exchange and read barrier (0.07-0.1 s of a 0.45 s load of a 306 MB fsdp shard).
            with state_mod.quiet_single_process(distributed=False):
                dcp.load(template, storage_reader=safe_reader(url, self.direct_read, metadata),
                         planner=SafeLoadPlanner(), no_dist=True)
        except (Exception, CheckpointException) as e:
            error = self._cause_error("load", e, url)
        self._agree(error)
        error = None
        per_rank: dict[str, Any] | None = None
        try:
            per_rank = state_mod.apply(entries, template, metadata, self.runtime.rank)
        except IgniterError as e:
            error = e
        except Exception as e:
            error = CheckpointError(f"Could not apply the state loaded from {url}: {type(e).__name__}: {e}.")
        self._agree(error)
        saved_world_size = int(manifest.get("world_size") or state_mod.saved_world_size(metadata))
        return LoadResult(step=step, manifest=manifest, per_rank=per_rank, saved_world_size=saved_world_size,
                          url=url)

    def _committed(self, step: int) -> tuple[dict[str, Any], str]:
        """Rank 0: the manifest and folder name of committed `step` (any padding), once its files match
        the manifest; DamagedCheckpoint when they do not."""
        try:
            folders = self._folders()
        except Exception as e:
            raise self.storage.error("list checkpoints in", e) from None
        f = folders.get(step)
        if f is None or not f.committed:
            committed = sorted(s for s, g in folders.items() if g.committed)
            have = f"its committed steps are {committed[-5:]}" if committed else "it has no committed checkpoint"
            raise CheckpointError(f"No committed checkpoint for step {step} in {self.storage.url}; {have}.")
        try:
            manifest = self._manifest(f.name)
        except IgniterError:
            raise
        except Exception as e:
            raise self.storage.error("read", e, self.storage.url_of(f.name, layout.MANIFEST)) from None
        problems = layout.file_problems(manifest, f.files)
        if problems:
            raise DamagedCheckpoint(f"The checkpoint {self.storage.url_of(f.name)} is damaged: {'; '.join(problems)}.")
        return manifest, f.name

    def _metadata(self, folder: str) -> Metadata:
        """DCP's index of committed `folder`, read through the restricted unpickler."""
        url = self.storage.url_of(folder)
        try:
            data = self.storage.read_bytes(folder, layout.DCP_METADATA)
        except FileNotFoundError:
            raise DamagedCheckpoint(f"The checkpoint {url} is damaged: {layout.DCP_METADATA} is missing.") from None
        except Exception as e:
            raise self.storage.error("read the metadata of", e, url) from None
        return load_metadata(io.BytesIO(data), url)

    def _report(self, message: str) -> None:
        if self.runtime.is_main:
            log.warning("%s", message)


def _metrics_of(manifest: dict[str, Any]) -> dict[str, float]:
    metrics = manifest.get("metrics")
    return metrics if isinstance(metrics, dict) else {}
