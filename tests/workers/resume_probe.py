"""A training script for resume tests: dropout, shuffled data, optional loader workers.

It can interrupt itself at a chosen global step (SIGTERM or SIGINT to itself from one rank,
SIGKILL of one rank on the first attempt under torchrun restarts) and reports a digest of the
final model + optimizer state, the samples it read, and how often the dataset was read.
"""

import hashlib
import json
import os
import signal
import time
from typing import Any, cast

import torch
import torch.nn as nn
import torchmetrics
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.utils.data import DataLoader, Dataset

import igniter_dist as ig
from igniter_dist.parallel import is_sharded
from igniter_dist.values import parse_bool
from igniter_dist.wrapping import unwrap


class Numbers(Dataset):
    def __init__(self, n: int, reads_file: str | None = None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x.sum(1) > 0).long()
        self.reads_file = reads_file

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.reads_file:  # one line per read, appended from whichever process reads
            with open(self.reads_file, "a") as f:
                f.write(f"{i}\n")
        return self.x[i], self.y[i], i


def state_digests(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[str, str]:
    """Collective: digests of the model's weights and of the whole state (weights and optimizer); under
    fsdp/hsdp the state is gathered to rank 0, which hashes it for every rank."""
    model_state: dict[str, Any]
    optim_state: dict[Any, Any]
    if is_sharded(model):
        msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        model_state, optim_state = msd, cast(dict[Any, Any], osd.get("state", {}))
    else:
        model_state, optim_state = unwrap(model).state_dict(), optimizer.state_dict()["state"]
    h = hashlib.sha256()
    for name, t in sorted(model_state.items()):
        h.update(name.encode() + t.detach().cpu().numpy().tobytes())
    weights = h.hexdigest()
    h = hashlib.sha256(weights.encode())
    for i, st in sorted(optim_state.items()):
        for k, v in sorted(st.items()):
            h.update(f"{i}{k}".encode() + (v.cpu().numpy().tobytes() if torch.is_tensor(v) else str(v).encode()))
    digests = (weights, h.hexdigest()) if model_state or not is_sharded(model) else None
    return ig.runtime().broadcast_object(digests)


def wait_for_stop(engine, report_dir: str, rank: int, timeout_s: float = 120.0) -> None:
    """Hold this step until a stop signal reached this rank: the marker waiting_rank<R> tells the test that
    every rank is mid-epoch, its loader workers running, so it can stop the job the way a launcher does."""
    with open(os.path.join(report_dir, f"waiting_rank{rank}"), "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + timeout_s
    while not engine.stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)


def main(args):
    rt = ig.runtime()
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    reads = os.path.join(args.report_dir, f"reads_rank{rt.rank}.txt") if args.count_reads else None
    os.makedirs(args.report_dir, exist_ok=True)
    train_loader = DataLoader(Numbers(args.n_train, reads), batch_size=args.batch_size, shuffle=True,
                              num_workers=args.workers)
    eval_loader = DataLoader(Numbers(args.n_eval), batch_size=args.eval_batch_size or 5)
    model = ig.prepare(nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2)))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    compute_dtypes: set[str] = set()  # of the first layer's weight inside the forward (fsdp: as gathered)
    unwrap(model).get_submodule("0").register_forward_pre_hook(lambda m, _: compute_dtypes.add(str(m.weight.dtype)))
    seen: list[int] = []
    engine_scaler = [None]

    fired: list[int] = []

    def maybe_interrupt(step: int, where: str) -> None:
        if args.interrupt_at == step and args.interrupt_where == where and first_attempt and not fired:
            fired.append(step)
            if args.interrupt_signal == "KILL" and rt.rank == args.interrupt_rank:
                os.kill(os.getpid(), signal.SIGKILL)
            elif args.interrupt_signal != "KILL" and rt.rank == args.interrupt_rank:
                os.kill(os.getpid(), getattr(signal, "SIG" + args.interrupt_signal))

    def train_step(engine, batch):
        x, y, idx = batch
        if not seen:  # where this process starts (every rank's first step): weights, step, learning rate
            weights, _ = state_digests(model, optimizer)
            with open(os.path.join(args.report_dir, f"start_rank{rt.rank}_{os.getpid()}.json"), "w") as f:
                json.dump({"model_digest": weights, "step": engine.state.step,
                           "lr": optimizer.param_groups[0]["lr"], "optimizer_state": len(optimizer.state)}, f)
        seen.extend(idx.tolist())
        engine_scaler[0] = engine.stepper.scaler
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        if args.engine_helpers:  # precision, accumulation and clipping handled by the engine
            engine.backward(loss)
            engine.optimizer_step(optimizer)
        else:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        maybe_interrupt(engine.state.step + 1, "train")
        if engine.state.step + 1 == args.wait_for_stop_at and first_attempt:
            wait_for_stop(engine, args.report_dir, rt.rank)
        return {"loss": loss}

    def eval_step(engine, batch):
        x, y, idx = batch
        maybe_interrupt(engine.state.step, "eval")
        return {"loss": nn.functional.cross_entropy(model(x), y), "index": idx.float(), "ones": torch.ones(len(idx))}

    metrics = ig.train(
        to_save={"model": model, "optimizer": optimizer},
        train_spec=ig.RunSpec(step=train_step, loader=train_loader, metrics={"loss": "loss"}),
        eval_spec=ig.RunSpec(step=eval_step, loader=eval_loader, metrics={
            "loss": "loss", "index": "index", "count": ig.Metric(torchmetrics.SumMetric(), "ones")}),
        **ig.train_kwargs(args),
        parameters=vars(args),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    with open(os.path.join(args.report_dir, f"rank{rt.rank}_attempt{attempt}_{os.getpid()}.json"), "w") as f:
        scaler = engine_scaler[0]
        weights, whole = state_digests(model, optimizer)
        json.dump({"digest": whole, "model_digest": weights, "seen": seen, "metrics": metrics,
                   "compute_dtypes": sorted(compute_dtypes),
                   "scaler": scaler.state_dict() if scaler is not None else None}, f)


def flags(parser):
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--n-eval", type=int, default=24)
    parser.add_argument("--interrupt-at", type=int, default=-1, help="global step (1-based) to interrupt after")
    parser.add_argument("--interrupt-where", default="train", choices=["train", "eval"])
    parser.add_argument("--interrupt-signal", default="TERM", choices=["TERM", "INT", "KILL"])
    parser.add_argument("--interrupt-rank", type=int, default=0)
    parser.add_argument("--count-reads", type=parse_bool, default=False)
    parser.add_argument("--engine-helpers", type=parse_bool, default=False)
    parser.add_argument("--wait-for-stop-at", type=int, default=-1,
                        help="global step (1-based) after which each rank waits for a stop signal from outside")
    # Agree on stop signals every step, so tests can aim interruptions at exact steps.
    parser.set_defaults(workers=0, batch_size=4, max_epochs=3, learning_rate=0.01, log_every=5, stop_check_every=1)


if __name__ == "__main__":
    ig.igniter_main(main, argparse_callback=flags)
