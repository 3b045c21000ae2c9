"""igniter-dist as its users write it: a step function, a RunSpec with a loss metric, console output on."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from workloads import BATCH_SIZE, LEARNING_RATE, LOG_EVERY, RunContext

import igniter_dist as ig


def run(ctx: RunContext, save_every: int | None = None) -> None:
    """`save_every`: checkpoint every that many steps (synchronous saves to a local folder); None: off."""
    model = ig.prepare(ctx.workload.model())
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    criterion = nn.CrossEntropyLoss()
    loader = DataLoader(ctx.dataset(), batch_size=BATCH_SIZE, shuffle=True)

    def train_step(engine, batch):
        ctx.clock.begin()
        inputs, labels = batch
        model.train()
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        ctx.clock.end()
        return {"loss": loss}

    ig.train(
        to_save={"model": model, "optimizer": optimizer},
        train_spec=ig.RunSpec(step=train_step, loader=loader, metrics={"loss": "loss"}),
        max_epochs=1,
        log_every=LOG_EVERY,
        checkpoint_dir=str(ctx.workdir / "checkpoints") if save_every else "none",
        save_every=f"{save_every}steps" if save_every else 0,
        output_dir=str(ctx.workdir / "output"),
        console=True,
    )


def run_with_checkpoints(ctx: RunContext) -> None:
    run(ctx, save_every=max(1, ctx.steps // 4))
