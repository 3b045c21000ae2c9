"""The training workloads every implementation runs: the same model, data, loss and optimizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import StepClock
from torch import nn
from torch.utils.data import TensorDataset

BATCH_SIZE = 64  # per rank
LEARNING_RATE = 1e-3
LOG_EVERY = 50  # every implementation reports the loss this often


@dataclass(frozen=True)
class Workload:
    name: str
    model: Callable[[], nn.Module]
    sample_shape: tuple[int, ...]
    classes: int = 10

    def dataset(self, samples: int, seed: int = 0) -> TensorDataset:
        """Synthetic inputs and labels; a TensorDataset indexes one sample at a time, like a map-style dataset."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(samples, *self.sample_shape, generator=g)
        y = torch.randint(0, self.classes, (samples,), generator=g)
        return TensorDataset(x, y)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def tiny() -> nn.Module:
    """One small linear layer: a step of a few hundred microseconds, so the framework's own time dominates."""
    return nn.Linear(32, 10)


WORKLOADS = {
    "mlp": Workload("mlp", mlp, (128,)),
    "cnn": Workload("cnn", cnn, (1, 28, 28)),
    "tiny": Workload("tiny", tiny, (32,)),
}


@dataclass(frozen=True)
class RunContext:
    """One timed run: train `workload` for exactly `steps` iterations per rank (one epoch), timing each."""

    workload: Workload
    steps: int
    rank: int
    world_size: int
    clock: StepClock
    workdir: Path  # a fresh, empty folder for this run's files

    def dataset(self) -> TensorDataset:
        return self.workload.dataset(self.steps * BATCH_SIZE * self.world_size)

    def log(self, step: int, loss: float) -> None:
        """What a hand-written loop prints every LOG_EVERY steps (rank 0 only)."""
        if self.rank == 0:
            print(f"step {step} loss {loss:.4f}", flush=True)
