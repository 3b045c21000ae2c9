"""Lightning Fabric: the user's loop, with Fabric setting up DDP, the sampler and backward."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from workloads import BATCH_SIZE, LEARNING_RATE, LOG_EVERY, RunContext


def run(ctx: RunContext) -> None:
    import lightning as L

    fabric = L.Fabric(accelerator="cpu", devices=ctx.world_size,
                      strategy="ddp" if ctx.world_size > 1 else "auto")
    fabric.launch()
    model = ctx.workload.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(ctx.dataset(), batch_size=BATCH_SIZE, shuffle=True))
    criterion = nn.CrossEntropyLoss()
    model.train()
    for step, (inputs, labels) in enumerate(loader, 1):
        ctx.clock.begin()
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        fabric.backward(loss)
        optimizer.step()
        ctx.clock.end()
        if step % LOG_EVERY == 0:
            ctx.log(step, loss.item())
