"""Train on a stream of JSONL or .npy shards from a folder or an s3:// prefix, resumed exactly.

    python examples/streaming/make_shards.py shards
    python examples/streaming/train_stream.py --data shards --max-steps 200
    torchrun --nproc-per-node 2 examples/streaming/train_stream.py --data s3://bucket/shards --max-steps 200 --workers 2

`--data` holds `train/*.jsonl` (or `*.npy`) and `eval/*.jsonl` shards (see make_shards.py). Each
rank and each loader worker reads its own shard files (`ig.shard_iterable`), the file order is
reshuffled every pass, and the dataset keeps its position (pass, file, byte offset), which
torchdata's StatefulDataLoader saves for every worker: a relaunch continues at the next record
without reading anything twice.
"""

import io
import json
import random
from collections.abc import Iterator

import fsspec
import numpy as np
import torch
import torch.nn as nn
import torchmetrics
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import igniter_dist as ig

FEATURES, CLASSES = 16, 4


def read_shard(fs, path: str, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The records of one shard from `start` (a byte offset in JSONL, a record in .npy), each with the
    position just after it."""
    if path.endswith(".jsonl"):
        with fs.open(path, "rb") as f:
            f.seek(start)  # straight to the next record: nothing before it is read again
            while line := f.readline():
                start += len(line)
                record = json.loads(line)
                yield torch.tensor(record["x"], dtype=torch.float32), torch.tensor(record["y"]), start
    else:
        array = np.load(io.BytesIO(fs.cat_file(path)))
        for i in range(start, len(array)):
            yield torch.from_numpy(array[i, :-1].copy()), torch.tensor(int(array[i, -1])), i + 1


class Shards(IterableDataset):
    """This reader's share of the shard files under a prefix, record by record, keeping its position."""

    def __init__(self, prefix: str, seed: int = 0, shuffle: bool = True):
        self.prefix, self.seed, self.shuffle = prefix, seed, shuffle
        self.passes = 0  # passes over this reader's share completed
        self.file = 0  # the current file, an index into this pass's share
        self.offset = 0  # where the next record starts in that file

    def my_files(self, fs, root: str) -> list[str]:
        files = sorted(p for p in fs.ls(root, detail=False) if p.endswith((".jsonl", ".npy")))
        if self.shuffle:  # the same order on every reader: the seed and the pass decide it
            random.Random(self.seed * 1_000_003 + self.passes).shuffle(files)
        return list(ig.shard_iterable(files))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        fs, root = fsspec.core.url_to_fs(self.prefix)  # here: in the worker process that reads
        files = self.my_files(fs, root)
        while self.file < len(files):
            for x, y, offset in read_shard(fs, files[self.file], self.offset):
                self.offset = offset  # before the yield: a record handed out is a record consumed
                yield x, y
            self.file, self.offset = self.file + 1, 0
        self.passes, self.file = self.passes + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"passes": self.passes, "file": self.file, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.passes, self.file, self.offset = state["passes"], state["file"], state["offset"]


def main(args):
    data = args.data.rstrip("/")
    train_loader = StatefulDataLoader(Shards(f"{data}/train", seed=args.seed), batch_size=args.batch_size,
                                      num_workers=args.workers)
    # Evaluation reads every eval record once over all ranks; its shards are read in order.
    eval_loader = StatefulDataLoader(Shards(f"{data}/eval", shuffle=False),
                                     batch_size=args.eval_batch_size or args.batch_size)
    model = ig.prepare(nn.Sequential(nn.Linear(FEATURES, args.hidden), nn.ReLU(), nn.Linear(args.hidden, CLASSES)))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    criterion = nn.CrossEntropyLoss()

    def train_step(engine, batch):
        x, y = batch
        model.train()
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        return {"loss": loss}

    def eval_step(engine, batch):
        x, y = batch
        logits = model(x)
        return {"loss": criterion(logits, y), "logits": logits, "labels": y, "one": torch.ones(len(y))}

    metrics = ig.train(
        to_save={"model": model, "optimizer": optimizer},
        train_spec=ig.RunSpec(step=train_step, loader=train_loader, metrics={"loss": "loss"}),
        eval_spec=ig.RunSpec(step=eval_step, loader=eval_loader, metrics={
            "loss": "loss",
            "accuracy": ig.Metric(torchmetrics.classification.MulticlassAccuracy(num_classes=CLASSES),
                                  "logits", "labels"),
            "records": ig.Metric(torchmetrics.SumMetric(), "one"),
        }),
        **ig.train_kwargs(args),
        parameters=vars(args),
    )
    if ig.runtime().is_main:
        print(f"final eval accuracy {metrics['eval/accuracy']:.4f} over {metrics['eval/records']:.0f} records")


def add_flags(parser):
    parser.add_argument("--hidden", type=int, default=64, help="Hidden units of the MLP.")
    parser.set_defaults(learning_rate=3e-3, batch_size=32, workers=0, eval_every="100steps", save_every="100steps")


if __name__ == "__main__":
    ig.igniter_main(main, inputs={"data": "data"}, argparse_callback=add_flags, description=__doc__.splitlines()[0])
