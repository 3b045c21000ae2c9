"""A training script for stream tests: an IterableDataset of numbered samples, sharded with ig.shard_iterable.

Sample i is a fixed function of i, so every run sees the same data. The stream may be endless or
end after a number of samples per rank (different on each rank), keep its position (state_dict) or
not, and be read by a plain DataLoader or torchdata's StatefulDataLoader with workers. The script
can interrupt itself at a global step (SIGTERM from rank 0), logs every sample the dataset reads
(reads_rank<r>_pid<p>.txt, appended from whichever process reads) and reports a digest of the
final model + optimizer, the samples it trained on, and the engine's counters.
"""

import json
import os
import signal
from itertools import count, islice

import torch
import torch.nn as nn
import torchmetrics
from resume_probe import state_digests, wait_for_stop  # a sibling script: this folder is on sys.path
from torch.utils.data import DataLoader, Dataset, IterableDataset

import igniter_dist as ig
from igniter_dist.runtime import rank_and_world_size
from igniter_dist.values import parse_bool


def sample(i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    x = torch.randn(6, generator=torch.Generator().manual_seed(i))
    return x, (x.sum() > 0).long(), i


class Numbers(IterableDataset):
    """This reader's share of samples 0, 1, 2, ...: endless, or `limits[rank]` of them per pass."""

    def __init__(self, limits: list[int] | None, reads_dir: str | None):
        self.limits = limits
        self.reads_dir = reads_dir
        self.pos = 0  # samples of this reader's share consumed in the current pass
        self.passes = 0

    def __iter__(self):
        share = ig.shard_iterable(count())
        if self.limits:
            share = islice(share, self.limits[rank_and_world_size()[0]])
        log = self._log()
        for i in islice(share, self.pos, None):  # skips by counting: nothing before `pos` is read
            self.pos += 1
            if log is not None:
                log.write(f"{i}\n")
            yield sample(i)
        self.pos, self.passes = 0, self.passes + 1

    def _log(self):
        if not self.reads_dir:
            return None
        path = os.path.join(self.reads_dir, f"reads_rank{rank_and_world_size()[0]}_pid{os.getpid()}.txt")
        return open(path, "a", buffering=1)


class StatefulNumbers(Numbers):
    def state_dict(self):
        return {"pos": self.pos, "passes": self.passes}

    def load_state_dict(self, state):
        self.pos, self.passes = int(state["pos"]), int(state["passes"])


class MapNumbers(Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return sample(i)


class EvalNumbers(IterableDataset):
    """Samples 0 .. n-1 shared out over the ranks: shards differ in length when n is odd."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return (sample(i) for i in ig.shard_iterable(range(self.n)))


def train_loader(args, rank: int):
    reads = args.report_dir if args.count_reads else None
    if args.data == "map":
        return DataLoader(MapNumbers(args.n_map), batch_size=args.batch_size, shuffle=True)
    limits = [int(n) for n in args.rank_samples.split(",")] if args.rank_samples else None
    dataset = (StatefulNumbers if args.stateful else Numbers)(limits, reads)
    if args.loader == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)


def main(args):
    rt = ig.runtime()
    os.makedirs(args.report_dir, exist_ok=True)
    model = ig.prepare(nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2)))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    seen: list[int] = []

    def train_step(engine, batch):
        x, y, idx = batch
        seen.extend(idx.tolist())
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if engine.state.step + 1 == args.interrupt_at and rt.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        if engine.state.step + 1 == args.wait_for_stop_at and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            wait_for_stop(engine, args.report_dir, rt.rank)
        return {"loss": loss, "one": torch.ones(len(idx))}

    def eval_step(engine, batch):
        x, y, idx = batch
        return {"loss": nn.functional.cross_entropy(model(x), y), "idx": idx.float(), "one": torch.ones(len(idx))}

    eval_spec = None
    if args.eval_samples:
        eval_spec = ig.RunSpec(step=eval_step, loader=DataLoader(EvalNumbers(args.eval_samples), batch_size=5),
                               metrics={"loss": "loss", "idx": "idx",
                                        "count": ig.Metric(torchmetrics.SumMetric(), "one")})
    metrics = ig.train(
        to_save={"model": model, "optimizer": optimizer},
        train_spec=ig.RunSpec(step=train_step, loader=train_loader(args, rt.rank),
                              metrics={"loss": "loss", "count": ig.Metric(torchmetrics.SumMetric(), "one")}),
        eval_spec=eval_spec,
        **ig.train_kwargs(args),
        parameters=vars(args),
    )
    with open(os.path.join(args.report_dir, f"rank{rt.rank}.json"), "w") as f:
        json.dump({"digest": state_digests(model, optimizer)[1], "seen": seen, "metrics": metrics}, f)


def flags(parser):
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--data", default="stream", choices=["stream", "map"])
    parser.add_argument("--n-map", type=int, default=48, help="samples of the map-style dataset")
    parser.add_argument("--rank-samples", default="", help="samples per pass on each rank, as 40,28 (default endless)")
    parser.add_argument("--stateful", type=parse_bool, default=True, help="the dataset keeps its position")
    parser.add_argument("--loader", default="plain", choices=["plain", "stateful"])
    parser.add_argument("--eval-samples", type=int, default=0)
    parser.add_argument("--interrupt-at", type=int, default=-1, help="global step (1-based) to interrupt after")
    parser.add_argument("--count-reads", type=parse_bool, default=False)
    parser.add_argument("--wait-for-stop-at", type=int, default=-1,
                        help="global step (1-based) after which each rank waits for a stop signal from outside")
    # Agree on stop signals every step, so tests can aim interruptions at exact steps.
    parser.set_defaults(workers=0, batch_size=4, learning_rate=0.01, log_every=1000, stop_check_every=1)


if __name__ == "__main__":
    ig.igniter_main(main, argparse_callback=flags)
