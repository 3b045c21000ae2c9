"""Classify scikit-learn's bundled handwritten digits (1,797 8x8 images, no download).

    python examples/digits/train.py                              # one process, CPU or one GPU
    torchrun --nproc-per-node 2 examples/digits/train.py         # DDP on 2 processes
    python examples/digits/train.py --device cuda                # the same file on a GPU

`--data` may point at a folder holding digits.npz (arrays `images` and `labels`), as a SageMaker
input channel would; without it the copy bundled with scikit-learn is used.
"""

import os

import numpy as np
import torch
import torch.nn as nn
import torchmetrics
from torch.utils.data import DataLoader, TensorDataset

import igniter_dist as ig


def load_digits(data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    path = os.path.join(data_dir, "digits.npz")
    if os.path.exists(path):
        arrays = np.load(path)
        return arrays["images"], arrays["labels"]
    from sklearn.datasets import load_digits as bundled

    digits = bundled()
    return digits.images, digits.target


def datasets(data_dir: str) -> tuple[TensorDataset, TensorDataset]:
    images, labels = load_digits(data_dir)
    x = torch.tensor(images, dtype=torch.float32).reshape(len(images), -1) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # fixed split
    n_eval = len(x) // 5
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[eval_idx], y[eval_idx])


def main(args):
    train_set, eval_set = datasets(args.data)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
    eval_loader = DataLoader(eval_set, batch_size=args.eval_batch_size or args.batch_size)
    model = ig.prepare(nn.Sequential(
        nn.Linear(64, args.hidden), nn.ReLU(), nn.Dropout(args.dropout), nn.Linear(args.hidden, 10)))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    criterion = nn.CrossEntropyLoss()

    def train_step(engine, batch):
        inputs, labels = batch
        model.train()
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    def eval_step(engine, batch):
        inputs, labels = batch
        logits = model(inputs)
        return {"loss": criterion(logits, labels), "logits": logits, "labels": labels}

    metrics = ig.train(
        to_save={"model": model, "optimizer": optimizer},
        train_spec=ig.RunSpec(step=train_step, loader=train_loader, metrics={"loss": "loss"}),
        eval_spec=ig.RunSpec(step=eval_step, loader=eval_loader, metrics={
            "loss": "loss",
            "accuracy": ig.Metric(torchmetrics.classification.MulticlassAccuracy(num_classes=10), "logits", "labels"),
        }),
        **ig.train_kwargs(args),
        parameters=vars(args),
    )
    if ig.runtime().is_main:
        print(f"final eval accuracy {metrics['eval/accuracy']:.4f}")


def add_flags(parser):
    parser.add_argument("--hidden", type=int, default=128, help="Hidden units of the MLP.")
    parser.add_argument("--dropout", type=float, default=0.1, help="Dropout probability.")
    parser.set_defaults(learning_rate=3e-3, batch_size=32, workers=0)


if __name__ == "__main__":
    ig.igniter_main(main, inputs={"data": "data"}, argparse_callback=add_flags, description=__doc__.splitlines()[0])
