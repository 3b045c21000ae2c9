"""pytorch-ignite: an Engine over the user's step, DDP and a DistributedSampler as ignite's examples set them up."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from workloads import BATCH_SIZE, LEARNING_RATE, LOG_EVERY, RunContext


def run(ctx: RunContext) -> None:
    from ignite.engine import Engine, Events

    model = ctx.workload.model()
    if ctx.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    criterion = nn.CrossEntropyLoss()
    dataset = ctx.dataset()
    sampler: DistributedSampler | None = None
    if ctx.world_size > 1:
        sampler = DistributedSampler(dataset, shuffle=True, seed=1)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler, shuffle=sampler is None)

    def train_step(engine, batch):
        ctx.clock.begin()
        inputs, labels = batch
        model.train()
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        ctx.clock.end()
        return loss.item()  # as ignite's examples return it

    trainer = Engine(train_step)

    @trainer.on(Events.ITERATION_COMPLETED(every=LOG_EVERY))
    def log(engine):
        ctx.log(engine.state.iteration, engine.state.output)

    if sampler is not None:
        sampler.set_epoch(0)
    trainer.run(loader, max_epochs=1)
