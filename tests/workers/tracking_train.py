"""A tiny igniter-dist training script for MLflow tests: a user secret flag and a self-inflicted SIGTERM.

    torchrun --nproc-per-node 2 tracking_train.py --mlflow-enable true --api-token ... --interrupt-at 8
"""

import os
import signal

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import igniter_dist as ig


def main(args):
    rt = ig.runtime()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g)
    y = (x.sum(1) > 0).long()
    train_loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    eval_loader = DataLoader(TensorDataset(x[:20], y[:20]), batch_size=5)
    model = ig.prepare(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def train_step(engine, batch):
        inputs, labels = batch
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        if engine.state.step + 1 == args.interrupt_at and rt.is_main:
            os.kill(os.getpid(), signal.SIGTERM)  # as SageMaker's spot interruption would
        return {"loss": loss}

    def eval_step(engine, batch):
        inputs, labels = batch
        return {"loss": nn.functional.cross_entropy(model(inputs), labels)}

    ig.train(
        to_save={"model": model, "optimizer": optimizer},
        train_spec=ig.RunSpec(step=train_step, loader=train_loader, metrics={"loss": "loss"}),
        eval_spec=ig.RunSpec(step=eval_step, loader=eval_loader, metrics={"loss": "loss"}),
        **ig.train_kwargs(args),
        parameters=vars(args),
    )


def flags(parser):
    parser.add_argument("--api-token", default=None, help="A user secret that must never be written.")
    parser.add_argument("--interrupt-at", type=int, default=-1, help="Global step to SIGTERM rank 0 after.")
    parser.set_defaults(workers=0, max_epochs=3, log_every=2, stop_check_every=1)  # stop at the aimed step


if __name__ == "__main__":
    ig.igniter_main(main, argparse_callback=flags)
