"""A training job on an endless stream of numbered samples, for the relaunch benchmark.

Each rank reads its share of samples 0, 1, 2, ... through ig.shard_iterable; with `--stateful true`
the dataset keeps its position (skipping ahead by arithmetic, as a dataset that seeks in its files
does), without it a relaunch reads and drops what was trained on. Rank 0 writes the wall time of its
first training step in this process to `--first-step-file`.
"""

import time
from collections.abc import Iterator
from itertools import count, islice

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, IterableDataset

import igniter_dist as ig
from igniter_dist.values import parse_bool

FEATURES = 16


class Numbers(IterableDataset):
    """This reader's share of the samples from its position on; sample i is a cheap function of i."""

    def __init__(self) -> None:
        self.pos = 0  # samples of this reader's share consumed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        first, second = islice(ig.shard_iterable(count()), 2)  # this reader's share: first + k * stride
        stride = second - first
        for i in count(first + self.pos * stride, stride):
            self.pos += 1
            yield torch.full((FEATURES,), (i % 97) / 97.0), torch.tensor([float(i % 2)])


class StatefulNumbers(Numbers):
    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pos = int(state["pos"])


def main(args) -> None:
    rt = ig.runtime()
    model = ig.prepare(nn.Linear(FEATURES, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    dataset = StatefulNumbers() if args.stateful else Numbers()
    first = [True]

    def train_step(engine, batch):
        if first[0] and rt.is_main and args.first_step_file:
            with open(args.first_step_file, "w") as f:
                f.write(repr(time.time()))
        first[0] = False
        x, y = batch
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    ig.train(to_save={"model": model, "optimizer": optimizer},
             train_spec=ig.RunSpec(step=train_step, loader=DataLoader(dataset, batch_size=args.batch_size),
                                   metrics={"loss": "loss"}),
             **ig.train_kwargs(args))


def flags(parser) -> None:
    parser.add_argument("--stateful", type=parse_bool, default=True, help="The dataset keeps its position.")
    parser.add_argument("--first-step-file", default="", help="Rank 0 writes its first step's wall time here.")
    parser.set_defaults(batch_size=1024, workers=0, save_every="0", eval_every="0", log_every=100_000)


if __name__ == "__main__":
    ig.igniter_main(main, argparse_callback=flags)
