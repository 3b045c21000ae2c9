"""A small igniter-dist script for engine tests; writes what it observed to --report-dir as JSON per rank.

Modes:
  train      train a tiny classifier; report final params digest, the train indices seen per epoch,
             the eval indices seen, and the returned metrics
  unprepared pass a plain (not prepared) model to ig.train
  bad-step   a train step that returns a string
  metrics    ig.evaluate with fixed per-sample values: string means (batch mean and per-sample)
             and MulticlassAccuracy, on a dataset size that does not divide by world x batch
"""

import hashlib
import json
import os
from typing import Any

import torch
import torch.nn as nn
import torchmetrics
from torch.utils.data import DataLoader, Dataset

import igniter_dist as ig
from igniter_dist.wrapping import unwrap


class Indexed(Dataset):
    """Sample i is (features, label, i): lets tests see exactly which samples each rank read."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()
        self.reads = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i], i


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(unwrap(model).state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(args):
    rt = ig.runtime()
    report: dict = {"rank": rt.rank, "world_size": rt.world_size}
    train_set, eval_set = Indexed(args.n_train), Indexed(args.n_eval, seed=1)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    eval_loader = DataLoader(eval_set, batch_size=args.eval_batch_size or args.batch_size)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    model = net if args.mode == "unprepared" else ig.prepare(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    seen_train: dict[int, list[int]] = {}
    seen_eval: list[int] = []

    def train_step(engine, batch):
        x, y, idx = batch
        seen_train.setdefault(engine.state.epoch, []).extend(idx.tolist())
        if args.mode == "bad-step":
            return "loss"
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    def eval_step(engine, batch):
        x, y, idx = batch
        seen_eval.extend(idx.tolist())
        logits = model(x)
        per_sample = nn.functional.cross_entropy(logits, y, reduction="none")
        return {"loss": per_sample.mean(), "per_sample": per_sample, "value": idx.double(),
                "logits": logits, "labels": y}

    eval_metrics: dict[str, Any] = {
        "loss": "loss",
        "per_sample": "per_sample",
        "value": "value",
        "double": lambda out: out["value"] * 2,
        "accuracy": ig.Metric(torchmetrics.classification.MulticlassAccuracy(num_classes=3), "logits", "labels"),
    }
    if args.mode == "metrics":
        metrics = ig.evaluate({"model": model}, ig.RunSpec(step=eval_step, loader=eval_loader, metrics=eval_metrics),
                              console=False)
    else:
        metrics = ig.train(
            to_save={"model": model, "optimizer": optimizer},
            train_spec=ig.RunSpec(step=train_step, loader=train_loader, metrics={"loss": "loss"}),
            eval_spec=ig.RunSpec(step=eval_step, loader=eval_loader, metrics=eval_metrics),
            **ig.train_kwargs(args),
            parameters=vars(args),
        )
    report.update(metrics=metrics, digest=digest(model), seen_train=seen_train, seen_eval=seen_eval,
                  train_reads=train_set.reads)
    os.makedirs(args.report_dir, exist_ok=True)
    with open(os.path.join(args.report_dir, f"rank{rt.rank}.json"), "w") as f:
        json.dump(report, f)


def flags(parser):
    parser.add_argument("--mode", default="train")
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=37)
    parser.set_defaults(workers=0, learning_rate=0.1, batch_size=8, max_epochs=2)


if __name__ == "__main__":
    ig.igniter_main(main, argparse_callback=flags)
