"""Who this process is: rank facts read from the launcher's environment, the process group, the device.

`runtime.py` is the only module that reads rank variables or starts the process group; everything
else receives the frozen `Runtime` it returns.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import torch
import torch.distributed as dist

from .errors import ConfigError
from .options import Options, option
from .values import parse_bool, positive_float

EnvironmentKind = Literal["single", "torchrun", "sagemaker"]


@dataclass(frozen=True)
class Runtime:
    """The frozen facts of this process; built once by `init_runtime`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    kind: EnvironmentKind = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    # Collectives. Each is called by every rank in the same order; each is a no-op on one process.

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Collective: every rank returns rank `src`'s `obj`."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Collective: every rank returns the list of all ranks' `obj`, by rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Collective: wait for every rank."""
        if self.distributed:
            dist.barrier()

    @property
    def collective_device(self) -> torch.device:
        """Where tensors for the default group's collectives must live (nccl needs CUDA)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


@dataclass(frozen=True)
class RuntimeOptions(Options):
    """The flags `igniter_main` starts the runtime with."""

    device: str = option("auto", group="distributed",
                         help="auto, cpu, cuda or cuda:N; each rank binds cuda:<local_rank>.")
    dist_timeout: float = option(1800.0, group="distributed", parse=positive_float,
                                 help="Seconds a collective may wait before the process group fails.")
    deterministic: bool = option(False, group="training", parse=parse_bool,
                                 help="Use deterministic algorithms only (and set CUBLAS_WORKSPACE_CONFIG).")


_current: Runtime | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _detect_kind() -> EnvironmentKind:
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return "single"
    if os.environ.get("SM_CURRENT_HOST") or os.environ.get("TRAINING_JOB_NAME"):
        return "sagemaker"
    return "torchrun"


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """Turn `--device` (auto, cpu, cuda, cuda:N, mps) into this rank's device."""
    requested = requested.strip().lower()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {requested} was requested but CUDA is not available on this machine; "
                "use --device cpu or --device auto."
            )
        if requested == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        try:
            return torch.device(requested)
        except RuntimeError:
            pass
    if requested == "mps" and torch.backends.mps.is_available():
        return torch.device("mps")
    raise ConfigError(
        f"--device {requested!r} is not a device this machine has; use auto, cpu, cuda or cuda:N."
    )


def init_runtime(device: str = "auto", timeout_s: float = 1800.0, *, deterministic: bool = False,
                 debug: bool = False) -> Runtime:
    """Read the launcher's variables, bind the device and start the process group if needed."""
    global _current
    if _current is not None:
        return _current
    if deterministic:
        set_deterministic()
    if debug:  # DDP and c10d explain mismatched collectives and unused parameters
        os.environ.setdefault("TORCH_DISTRIBUTED_DEBUG", "DETAIL")
    kind = _detect_kind()
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    node_rank = _env_int("GROUP_RANK", rank // max(1, local_world_size))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = None
    if world_size > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=timeout_s)
            dist.init_process_group(
                backend=backend,
                timeout=timeout,
                device_id=dev if dev.type == "cuda" else None,
                **_attempt_store(rank, world_size, timeout),
            )
    _current = Runtime(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        node_rank=node_rank,
        device=dev,
        backend=backend,
        kind=kind,
    )
    return _current


def set_deterministic() -> None:
    """Deterministic algorithms everywhere; cuBLAS needs its workspace set before CUDA starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict[str, Any]:
    """Under torchrun restarts, a store namespace of this attempt's own.

    torchrun's workers share the agent's TCPStore across restarts (torch 2.13 adds no per-attempt
    prefix), so a restarted gloo group reads the dead attempt's addresses and fails to connect.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    attempt = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"igniter_dist/attempt_{attempt}", store), "rank": rank,
            "world_size": world_size}


def shutdown_runtime(barrier: bool = False) -> None:
    """Destroy the process group and forget the runtime.

    With `barrier` (a collective: only when every rank ends the same way) ranks leave together, so no
    rank tears its connections down while a peer's transport still reads from them.
    """
    global _current
    if dist.is_available() and dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    _current = None


def exit_process(code: int, distributed: bool) -> NoReturn:
    """End this process with `code`, once everything is saved and the process group is destroyed.

    After a distributed run, torch's C++ globals sometimes abort while the interpreter tears down
    ("terminate called without an active exception", SIGABRT with no Python frame), turning a
    finished run into a crash; such a process flushes its streams and skips that teardown.
    """
    if not distributed:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def runtime_was_distributed() -> bool:
    """Whether this process runs in a process group of several ranks."""
    return _current is not None and _current.distributed


def rank_and_world_size() -> tuple[int, int]:
    """This process's rank and world size without starting anything: the runtime's, else the launcher's
    variables (a DataLoader worker started by spawn has no runtime, and must never start a process group)."""
    if _current is not None:
        return _current.rank, _current.world_size
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def runtime() -> Runtime:
    """The facts of this process; starts a runtime with defaults when `igniter_main` has not."""
    return _current if _current is not None else init_runtime()
