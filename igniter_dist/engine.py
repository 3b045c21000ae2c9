"""The loop: run the user's step functions over sharded data, with metrics, evaluation and checkpoints.

The engine calls its collaborators directly (metrics, checkpoints, sinks, the stop flag); there is
no event bus. `Engine.run` is the whole training loop and reads top to bottom.
"""

from __future__ import annotations

import contextlib
import operator
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from itertools import islice, repeat
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .data import ShardedSampler, is_stream, seed_workers, train_sampler
from .errors import ConfigError, StepOutputError
from .metrics import MetricSet
from .parallel import is_sharded, reshard
from .parallel.lockstep import lockstep
from .resume import Checkpoints, RankState, RunState
from .runtime import Runtime
from .schedule import Schedule
from .signals import Interrupted, StopFlag, start_iterator, stop_workers
from .spec import RunSpec
from .steps import GradientStepper, SchedulerSpec, StepOptions
from .streams import Stream
from .tracking.base import NullSink, Progress, Sink
from .wrapping import sync_buffers

if TYPE_CHECKING:
    from .debug import DebugChecks


@dataclass
class EngineState:
    """The counters that locate the loop; saved in every checkpoint."""

    step: int = 0  # training iterations done, over all epochs
    epoch: int = 0  # epochs completed
    iteration: int = 0  # iterations done in the current epoch
    optimizer_step: int = 0  # accumulation windows closed: what --max-steps counts, as Lightning does


@dataclass
class Loop:
    """A RunSpec made ready to run: its sharded loader, metric set and epoch length."""

    name: str
    spec: RunSpec
    loader: Any
    metrics: MetricSet
    epoch_length: int | None
    max_batches: int | None = None  # evaluation: read at most this many batches (debug mode)


class Engine:
    """Runs training and evaluation loops; handed to every step function as its first argument."""

    def __init__(self, *, runtime: Runtime, train: Loop, evaluators: dict[str, Loop], schedule: Schedule,
                 to_save: Mapping[str, Any], sinks: Sink | None = None, checkpoints: Checkpoints | None = None,
                 stop: StopFlag | None = None, seed: int = 1, step_options: StepOptions | None = None,
                 debug: DebugChecks | None = None):
        self.runtime = runtime
        self.train_loop = train
        self.evaluators = evaluators
        self.schedule = schedule
        self.to_save = dict(to_save)
        self.sinks: Sink = sinks or NullSink()
        self.checkpoints = checkpoints
        self.stop = stop or StopFlag(runtime.distributed)
        self.seed = seed
        self.modules = [m for m in self.to_save.values() if isinstance(m, nn.Module)]
        optimizers = [o for o in self.to_save.values() if isinstance(o, torch.optim.Optimizer)]
        self.stepper = GradientStepper(step_options or StepOptions(), runtime, self.modules, optimizers)
        self.sharded_modules = [m for m in self.modules if is_sharded(m)]
        self.schedulers = [s for s in self.to_save.values() if isinstance(s, SchedulerSpec)]
        self.stream = (Stream(train.loader, runtime, seed=seed, group=self.stop.group) if is_stream(train.loader)
                       else None)
        self.debug = debug  # replica agreement and a checkpoint round trip
        self.state = EngineState()
        self.metrics: dict[str, float] = {}  # the latest value of every logged metric
        self._last_save = time.monotonic()
        self._step_times = _Throughput()
        self._logged_step = -1
        self._resume_position: int | None = None
        self._empty_warned: set[str] = set()  # evaluators already reported as having no samples
        self._cut_by_steps = False  # whether this epoch's batches end at --max-steps, before the epoch's end
        self._save_owed = False  # a save came due inside an accumulation window: it happens at the window's end
        self._batches: Any = None  # this epoch's loader iterator: its worker processes, shut down after a stop

    # ---------------------------------------------------------------- the loop

    def run(self) -> dict[str, float]:
        """Train to `max_epochs` or `max_steps` (evaluating, logging and saving on schedule); returns the final
        metrics."""
        self._step_times.start(self.state.step)
        # Sinks get the loop's position every step only while a bar is live; else where a line prints,
        # and at the first step, from which the console's rate counts.
        first, live, log_every = self.state.step + 1, self.sinks.live, self.schedule.log_every
        # The common step (full precision, no accumulation) is called here, not through two engine frames:
        # between two steps every call runs on caches the step just evicted (on 2 ranks, after a wait).
        step_fn = self.train_loop.spec.step if self.stepper.plain else None
        metrics = self.train_loop.metrics
        update = metrics.per_step()
        timed_saves = self.schedule.save_every_minutes is not None
        # One process has nothing to agree on: the flag the handler set is read as it is, without a call.
        stop, poll = self.stop, self.stop.poll if self.stop.distributed else None
        if self.stream is not None and not self._finished():
            self.stream.resume(self.state.step, self.state.iteration)  # collective once, when resumed
        stopping = 0  # an agreed stop signal, held until the accumulation window closes
        while not self.schedule.done(self.state.epoch, self.state.optimizer_step):
            start, fresh = self.state.step, self.state.iteration == 0
            due = self._next_due()
            for batch in self._train_batches():
                if step_fn is not None:
                    output = step_fn(self, batch)
                    if type(output) is not dict:  # the ABC's check only for others
                        output = self._checked(self.train_loop, output)
                else:
                    output = self._train_step(batch)
                update(output, batch_size(batch))
                self.state.step += 1
                self.state.iteration += 1
                self.state.optimizer_step += self.stepper.boundary
                if live or self.state.step == first or self.state.step % log_every == 0:
                    self.sinks.progress(self._progress())
                    update = metrics.per_step()  # the outputs are checked now: maybe one frame fewer
                save_due = timed_saves and self._time_to_save()
                if poll is None:
                    stopping = stopping or stop.requested
                else:
                    signum, save_due = poll(save_due)  # collective, overlapped
                    stopping = stopping or signum
                if stopping and self.stepper.boundary:  # saves resume the same computation only between windows
                    self._emergency_save(stopping)
                if save_due or self.state.step >= due:
                    self._after_step(save_due)
                    due = self._next_due()
            if fresh and self.state.step == start:
                # Every rank knows it (a stream's end is agreed, sized loaders pad), so every rank raises.
                raise ConfigError(f"The training loader gave no batch in epoch {self.state.epoch + 1} (on at least "
                                  "one rank), so no step can run; check the dataset, and that ig.shard_iterable "
                                  "leaves every rank a share.")
            if not live:
                self.sinks.progress(self._progress())  # the epoch's end prints a line
            ended = not (self._cut_by_steps and self._finished())
            if ended:
                self.state.epoch += 1
                self.state.iteration = 0
            self._after_epoch(ended)
        self.stop.drain()
        # Metrics are global already; the clock-based rates are rank 0's, so every rank returns the same.
        return self.runtime.broadcast_object(dict(self.metrics))

    def _after_step(self, save_due: bool) -> None:
        s, sched = self.state, self.schedule
        if self.schedulers:
            self._step_schedulers("step")
        if self.debug is not None:
            self.debug.after_step(self)
        if s.step % sched.log_every == 0:
            self._log_train()
        if self._cut_by_steps and self._finished():
            return  # the last step of --max-steps: the run's end evaluates and saves it, once
        if sched.eval_every.due(s.step, s.epoch, epoch_ended=False):
            self.evaluate()
        # A save due inside an accumulation window waits for its last micro-batch (at most k - 1 more).
        self._save_owed = self._save_owed or save_due or sched.save_every.due(s.step, s.epoch, epoch_ended=False)
        if self._save_owed and self.stepper.boundary:
            self._save()

    def _next_due(self) -> int:
        """The next step after which `_after_step` has work (a log, a step-scheduled evaluation or save), or the
        next step when it has work every step (step schedulers, --debug)."""
        step, sched = self.state.step, self.schedule
        if self.schedulers or self.debug is not None or self._save_owed:
            return step + 1
        scheduled = (sched.eval_every, sched.save_every)
        periods = [sched.log_every] + [e.n for e in scheduled if e.unit == "steps" and e.n > 0]
        return min((step // n + 1) * n for n in periods)

    def _after_epoch(self, ended: bool) -> None:
        """After an epoch's last batch, or the last step of --max-steps in mid-epoch (`ended` False)."""
        s, sched = self.state, self.schedule
        if ended:
            self._step_schedulers("epoch")
        self._log_train(epoch_end=True)
        last = self._finished()
        if (ended and sched.eval_every.due(s.step, s.epoch, epoch_ended=True)) or (last and self.evaluators):
            self.evaluate()
        if last or (ended and sched.save_every.due(s.step, s.epoch, epoch_ended=True)):
            self._save()

    def _finished(self) -> bool:
        return self.schedule.done(self.state.epoch, self.state.optimizer_step)

    # ---------------------------------------------------------------- steps and batches

    def _train_batches(self) -> Iterator[Any]:
        """This epoch's batches on the device: to the epoch's end, or to the last step of --max-steps."""
        loop, s = self.train_loop, self.state
        remaining = None if loop.epoch_length is None else loop.epoch_length - s.iteration
        batches: Iterator[Any] | None = None
        if self.stream is None:
            batches, remaining = self._sized_epoch(remaining)
        to_max_steps = self._batches_to_max_steps()
        self._cut_by_steps = to_max_steps is not None and (remaining is None or to_max_steps < remaining)
        limit = to_max_steps if self._cut_by_steps else remaining
        batches = self.stream.batches(limit) if self.stream is not None else islice(batches or iter(()), limit)
        return map(to_device, batches, repeat(self.runtime.device))  # no generator frame before the loop

    def _sized_epoch(self, remaining: int | None) -> tuple[Iterator[Any], int | None]:
        """A sized loader's epoch from the current iteration, and how many batches are left in it."""
        loop, s = self.train_loop, self.state
        sampler = train_sampler(loop.loader)
        skip = 0
        if isinstance(sampler, ShardedSampler):  # start mid-epoch without reading skipped samples
            position = self._position()
            if self._resume_position is not None:  # saved by another world size: same global order
                position, self._resume_position = self._resume_position, None
                remaining = None if loop.spec.epoch_length is None else loop.spec.epoch_length - s.iteration
            sampler.set_epoch(s.epoch, position)
        else:
            if sampler is not None:
                sampler.set_epoch(s.epoch)
            skip = s.iteration  # cannot seek: read and drop what was trained on
        seed_workers(loop.loader, self.seed, s.epoch, self.runtime.rank)
        self._batches = start_iterator(loop.loader)
        return islice(self._batches, skip, None), remaining

    def _batches_to_max_steps(self) -> int | None:
        """Batches until the last optimizer step of --max-steps (accumulation windows start with the epoch)."""
        if self.schedule.max_steps is None:
            return None
        k = self.stepper.options.accumulate_grad_batches
        return max(0, (self.schedule.max_steps - self.state.optimizer_step) * k - self.state.iteration % k)

    def _train_step(self, batch: Any) -> Mapping[str, Any]:
        with self.stepper.micro_step(self.state.iteration, self.train_loop.epoch_length):
            return self._call(self.train_loop, batch)

    def _step_schedulers(self, interval: str) -> None:
        if interval == "step" and not self.stepper.boundary:
            return  # mid accumulation window: no optimizer step was taken
        for spec in self.schedulers:
            if spec.interval == interval:
                spec.scheduler.step()

    # Helpers for the user's step function.

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of `loss`: averaged over `--accumulate-grad-batches`, scaled for 16-mixed precision."""
        self.stepper.backward(loss)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step `optimizer` at the end of an accumulation window (unscale, clip, step, zero_grad).

        Returns True if it stepped."""
        return self.stepper.optimizer_step(optimizer)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The `--precision` autocast context (steps already run inside it; use it for extra forwards)."""
        return self.stepper.autocast()

    def _call(self, loop: Loop, batch: Any) -> Mapping[str, Any]:
        output = loop.spec.step(self, batch)
        return output if type(output) is dict else self._checked(loop, output)  # the ABC's check only for others

    @staticmethod
    def _checked(loop: Loop, output: Any) -> Mapping[str, Any]:
        """A step's output that is not a dict: a Mapping is fine, anything else is refused."""
        if not isinstance(output, Mapping):
            raise StepOutputError(
                f"The {loop.name} step returned a {type(output).__name__}; it must return a dict of "
                "tensors or numbers, such as {'loss': loss}."
            )
        return output

    # ---------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float]:
        """Collective: run every evaluator over its whole loader; log and return the metrics.

        The models are evaluated with rank 0's buffers, the copy that is checkpointed and exported.
        An evaluator whose loader has no sample on any rank is skipped, with one warning.
        """
        results: dict[str, float] = {}
        if not self.evaluators:
            return results
        sync_buffers(self.modules, self.runtime)
        for name, loop in self.evaluators.items():
            samples = 0
            with self._eval_mode(), torch.no_grad(), self.stepper.autocast():
                for i, (batch, counted) in enumerate(self._eval_batches(loop), 1):
                    batch = to_device(batch, self.runtime.device)
                    output = self._call(loop, batch)
                    if counted:  # a replayed batch (fsdp, uneven shards) ran for its collectives only
                        n = batch_size(batch)
                        samples += n
                        self.sinks.eval_progress(name, i, eval_length(loop.loader, loop.max_batches))
                        loop.metrics.update(output, n, where=name)
            if self._no_samples_anywhere(samples):
                self._warn_empty(name)
                loop.metrics.reset()
                continue
            results.update({f"{name}/{k}": v for k, v in loop.metrics.compute().items()})
            loop.metrics.reset()
        if results:
            self._publish(results)
        return results

    def _eval_batches(self, loop: Loop) -> Iterator[tuple[Any, bool]]:
        """The evaluator's batches, each with whether its outputs count. A sharded model's forward is a
        collective, so then the ranks run in lockstep: a rank whose shard ran out replays a batch, uncounted."""
        batches = islice(start_iterator(loop.loader), loop.max_batches)
        if not (self.sharded_modules and self.runtime.distributed):
            return ((batch, True) for batch in batches)
        return lockstep(batches, eval_length(loop.loader, loop.max_batches), self.runtime)

    def _no_samples_anywhere(self, samples: int) -> bool:
        """Collective: whether no rank evaluated a sample (one rank without any is normal on uneven shards)."""
        if not self.runtime.distributed:
            return samples == 0
        most = torch.tensor([samples], device=self.runtime.collective_device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        return int(most.item()) == 0  # host sync: once per evaluation

    def _warn_empty(self, name: str) -> None:
        if self.runtime.is_main and name not in self._empty_warned:
            print(f"igniter-dist: warning: the {name} loader gave no samples on any rank, so its evaluation is "
                  "skipped; give it data or leave it out of eval_spec", file=sys.stderr, flush=True)
        self._empty_warned.add(name)

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        modules = self.modules
        was_training = [m.training for m in modules]
        # DDP broadcasts buffers in the first forward after a training step; with uneven eval
        # shards a rank with no batch would never join it, so evaluation skips that sync.
        ddps = [m for m in modules if isinstance(m, nn.parallel.DistributedDataParallel)]
        sync_flags = [m.require_forward_param_sync for m in ddps]
        for m in modules:
            m.eval()
        for m in ddps:
            m.require_forward_param_sync = False
        try:
            yield
        finally:
            for m, flag in zip(modules, was_training, strict=True):
                m.train(flag)
            for m, flag in zip(ddps, sync_flags, strict=True):
                m.require_forward_param_sync = flag
            for m in self.sharded_modules:  # the root keeps its gathered parameters after a forward
                reshard(m)

    # ---------------------------------------------------------------- metrics, checkpoints

    def _log_train(self, epoch_end: bool = False) -> None:
        """Collective: compute training metrics over the interval since the last log."""
        if epoch_end and self._logged_step == self.state.step:
            return  # the epoch's last interval was just logged
        self._logged_step = self.state.step
        values = {f"train/{k}": v for k, v in self.train_loop.metrics.compute().items()}
        self.train_loop.metrics.reset()
        values.update(self._step_times.rates(self.state.step, self.runtime.world_size, self._batch_size()))
        values.update(self._learning_rates())
        self._publish(values)

    def _publish(self, values: dict[str, float]) -> None:
        self.metrics.update(values)
        s = self.state  # the 1-based epoch in progress, or the one just completed
        self.sinks.log_metrics(values, s.step, s.epoch + 1 if s.iteration else s.epoch)

    def _learning_rates(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, obj in self.to_save.items():
            if isinstance(obj, torch.optim.Optimizer):
                for i, group in enumerate(obj.param_groups):
                    lr = group.get("lr")
                    if isinstance(lr, torch.Tensor):
                        lr = lr.item()  # a tensor LR (capturable optimizers): read only at log time
                    if lr is not None:
                        out[f"train/lr/{name}" + (f"/{i}" if len(obj.param_groups) > 1 else "")] = float(lr)
        return out

    def _batch_size(self) -> int | None:
        return getattr(self.train_loop.loader, "batch_size", None)

    def _time_to_save(self) -> bool:
        minutes = self.schedule.save_every_minutes
        # Rank 0's clock decides; the decision travels in the stop-flag all-reduce.
        return (minutes is not None and self.runtime.is_main
                and time.monotonic() - self._last_save >= minutes * 60)

    def _save(self) -> None:
        """Collective: every rank saves the same step (no-op without a checkpoint dir)."""
        self._last_save, self._save_owed = time.monotonic(), False
        if self.checkpoints is None:
            return
        sync_buffers(self.modules, self.runtime)  # the checkpoint holds rank 0's copy, whichever rank writes it
        s = self.state
        manifest: dict[str, Any] = {"epoch": s.epoch, "iteration": s.iteration}
        if self.sinks.run_id:
            manifest["tracking_run_id"] = self.sinks.run_id
        # DCP may step the optimizers to build their state, here and in --debug's round trip: no training step.
        with self.stepper.engine_calls():
            if self.checkpoints.save(s.step, self.checkpoint_state(), manifest=manifest, metrics=dict(self.metrics)):
                self.sinks.set_tag("checkpoint", self.checkpoints.url_of(s.step))
                self.sinks.flush()
                if self.debug is not None:
                    self.debug.after_save(self)

    def _emergency_save(self, signum: int) -> None:
        """Collective: save the agreed step, say how long it took (launchers kill after a grace period)."""
        start = time.perf_counter()
        self.sinks.progress(self._progress())  # where the run stopped, for sinks that are not live
        self._save()
        if self.checkpoints is not None:
            self.checkpoints.wait()
            if self.runtime.is_main:
                print(f"igniter-dist: saved step {self.state.step} to {self.checkpoints.url_of(self.state.step)} in "
                      f"{time.perf_counter() - start:.2f} s after {signal.Signals(signum).name}",
                      file=sys.stderr, flush=True)
        self.sinks.flush()
        self._stop_workers()  # they ignore the signal, so that they outlive the save
        raise Interrupted(signum)

    def _stop_workers(self) -> None:
        if self.stream is not None:
            self.stream.stop_workers()
        else:
            stop_workers(self._batches)

    def _progress(self) -> Progress:
        s = self.state
        return Progress(step=s.step, epoch=s.epoch + 1, iteration=s.iteration,
                        epoch_length=self.train_loop.epoch_length, max_epochs=self.schedule.max_epochs,
                        optimizer_step=s.optimizer_step, max_steps=self.schedule.max_steps)

    # ---------------------------------------------------------------- resumable state

    def _position(self) -> int:
        """Global samples consumed in the current epoch (all ranks together)."""
        sampler = train_sampler(self.train_loop.loader)
        if not isinstance(sampler, ShardedSampler):
            return 0
        bs = self.train_loop.loader.batch_size
        return min(sampler.size, self.state.iteration * bs * self.runtime.world_size)

    def checkpoint_state(self) -> RunState:
        """What a checkpoint saves of this run: `to_save`, the engine, the loss scaler; this rank's own state."""
        shared = {**self.to_save, "engine": self}
        if self.stepper.scaler is not None:  # 16-mixed: the loss scale must survive a resume
            shared["grad_scaler"] = self.stepper.scaler
        return RunState(shared=shared, per_rank=RankState(self.train_loop.metrics, self.stream))

    def state_dict(self) -> dict[str, Any]:
        """The loop's counters and latest metrics (the "engine" entry of a checkpoint)."""
        return {**asdict(self.state), "position": self._position(), "world_size": self.runtime.world_size,
                "metrics": dict(self.metrics),
                "stream_positions": self.stream is not None and self.stream.position is not None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved_world_size = int(state.get("world_size", self.runtime.world_size))
        if saved_world_size != self.runtime.world_size and state.get("stream_positions"):
            raise ConfigError(
                f"This checkpoint holds the training stream's position on each of its {saved_world_size} ranks, "
                f"which cannot be shared out over {self.runtime.world_size}; resume it with {saved_world_size} "
                "ranks, or start a new run in another --checkpoint-dir."
            )
        step = int(state["step"])
        self.state = EngineState(step=step, epoch=int(state["epoch"]), iteration=int(state["iteration"]),
                                 optimizer_step=int(state.get("optimizer_step", step)))
        self.metrics = {k: float(v) for k, v in dict(state.get("metrics", {})).items()}
        if saved_world_size != self.runtime.world_size:
            self._resume_position = int(state.get("position", 0))


class _Throughput:
    """Iterations/s, samples/s and seconds/step over each logging interval (host clock only)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._step = 0

    def start(self, step: int) -> None:
        self._t, self._step = time.perf_counter(), step

    def rates(self, step: int, world_size: int, batch_size: int | None) -> dict[str, float]:
        now = time.perf_counter()
        steps, elapsed = step - self._step, now - self._t
        self._t, self._step = now, step
        if steps <= 0 or elapsed <= 0:
            return {}
        out = {"train/iterations_per_s": steps / elapsed, "train/seconds_per_step": elapsed / steps}
        if batch_size:
            out["train/samples_per_s"] = steps * batch_size * world_size / elapsed
        return out


def batch_size(batch: Any) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    while isinstance(batch, (list, tuple)) and batch:  # the common (inputs, labels): no recursion
        batch = batch[0]
    if isinstance(batch, torch.Tensor):
        shape = batch.shape  # one attribute read: ndim would be a second
        return shape[0] if shape else 1
    if isinstance(batch, Mapping):
        for v in batch.values():
            return batch_size(v)
    return len(batch) if hasattr(batch, "__len__") else 1


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to the device; pinned memory goes asynchronously."""
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, (list, tuple)):  # before Mapping: an ABC's isinstance is the slower check
        # The common (inputs, labels) of a CPU run, already there: a plain loop, no list built, no call per item.
        for v in batch:
            if not isinstance(v, torch.Tensor) or v.device != device:
                break
        else:
            return batch
        items = [to_device(v, device) for v in batch]
        if all(map(operator.is_, items, batch)):
            return batch  # already there (a CPU run): no new container per step
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*items)
        return type(batch)(items)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        return type(batch)(moved) if isinstance(batch, dict) else moved
    return batch


def check_epoch_length(loader: Any, epoch_length: int | None, what: str) -> int | None:
    """The iterations of one epoch: `epoch_length` capped by the loader, or the loader's length."""
    try:
        n = len(loader)
    except TypeError:
        return epoch_length
    if epoch_length is None:
        return n
    if epoch_length > n:
        raise ConfigError(
            f"epoch_length {epoch_length} is longer than the {what} loader ({n} batches per rank); "
            f"use at most {n} or leave it unset."
        )
    return epoch_length


def eval_length(loader: Any, max_batches: int | None) -> int | None:
    """The batches one evaluation reads on this rank: the loader's length, at most `max_batches`."""
    try:
        n = len(loader)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)
