"""Lightning Trainer: a LightningModule, `self.log` of the loss, the progress bar at the log interval.

The Trainer runs forward and backward inside the optimizer's closure, so the step is timed by
hooks on the optimizer: from its pre-step hook (before the closure) to its post-step hook.
Lightning's code inside the closure therefore counts as step time, not as framework time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from workloads import BATCH_SIZE, LEARNING_RATE, LOG_EVERY, RunContext


def run(ctx: RunContext) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = ctx.workload.model()
            self.criterion = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            inputs, labels = batch
            loss = self.criterion(self.net(inputs), labels)
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=LEARNING_RATE)
            optimizer.register_step_pre_hook(lambda *_: ctx.clock.begin())
            optimizer.register_step_post_hook(lambda *_: ctx.clock.end())
            return optimizer

    trainer = L.Trainer(
        accelerator="cpu", devices=ctx.world_size, strategy="ddp" if ctx.world_size > 1 else "auto",
        max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=LOG_EVERY, callbacks=[TQDMProgressBar(refresh_rate=LOG_EVERY)],
        default_root_dir=str(ctx.workdir),
    )
    trainer.fit(Module(), train_dataloaders=DataLoader(ctx.dataset(), batch_size=BATCH_SIZE, shuffle=True))
