"""The baseline: a hand-written DDP loop, as a user writes it without a framework."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from workloads import BATCH_SIZE, LEARNING_RATE, LOG_EVERY, RunContext


def run(ctx: RunContext) -> None:
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
    if sampler is not None:
        sampler.set_epoch(0)
    model.train()
    for step, (inputs, labels) in enumerate(loader, 1):
        ctx.clock.begin()
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        ctx.clock.end()
        if step % LOG_EVERY == 0:
            ctx.log(step, loss.item())
