"""Hugging Face Accelerate: the user's loop with `accelerator.prepare` and `accelerator.backward`."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from workloads import BATCH_SIZE, LEARNING_RATE, LOG_EVERY, RunContext


def run(ctx: RunContext) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = ctx.workload.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loader = DataLoader(ctx.dataset(), batch_size=BATCH_SIZE, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    criterion = nn.CrossEntropyLoss()
    model.train()
    for step, (inputs, labels) in enumerate(loader, 1):
        ctx.clock.begin()
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        accelerator.backward(loss)
        optimizer.step()
        ctx.clock.end()
        if step % LOG_EVERY == 0:
            ctx.log(step, loss.item())
