"""A BatchNorm model whose ranks train on differently distributed data, so their running statistics differ.

Each rank reports its final state digest and buffers, the buffers it held after its last training
forward (before anything synchronised them), and the final metrics. Besides `eval`, two evaluators
read one sample (rank 1 gets none) and no sample at all. `--interrupt-at N` sends SIGTERM to rank
0 after global step N on a first attempt.
"""

import hashlib
import json
import os
import signal

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import igniter_dist as ig
from igniter_dist.wrapping import unwrap


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32),
                         nn.ReLU(), nn.Linear(32, 2))


def eval_set() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(22, 6, generator=g) * 1.5 + 0.5
    return TensorDataset(x, (x[:, 0] > x[:, 1]).long())


def train_set(rank: int) -> TensorDataset:
    """Rank r's own data: shifted and scaled by r, so each rank's BatchNorm statistics are its own."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g) * (1 + rank) + 2.0 * rank
    return TensorDataset(x, (x[:, 0] > x[:, 1]).long())


def eval_outputs(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    logits = net(x)
    return {"loss": nn.functional.cross_entropy(logits, y), "correct": (logits.argmax(1) == y).float()}


def digest(state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode() + t.detach().cpu().numpy().tobytes())
    for i, st in sorted(optimizer.state_dict()["state"].items()):
        for k, v in sorted(st.items()):
            h.update(f"{i}{k}".encode() + (v.cpu().numpy().tobytes() if torch.is_tensor(v) else str(v).encode()))
    return h.hexdigest()


def buffers(net: nn.Module) -> dict[str, list]:
    return {name: b.tolist() for name, b in unwrap(net).named_buffers()}


def main(args):
    rt = ig.runtime()
    net = ig.prepare(model())
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    total_steps = args.max_epochs * len(train_set(rt.rank)) // rt.world_size // args.batch_size
    after_last_forward: dict[str, list] = {}

    def train_step(engine, batch):
        x, y = batch
        net.train()
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        step = engine.state.step + 1
        if step == total_steps:
            after_last_forward.update(buffers(net))
        if step == args.interrupt_at and first_attempt and rt.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss": loss}

    def eval_step(engine, batch):
        return eval_outputs(net, *batch)

    metrics = ig.train(
        to_save={"model": net, "optimizer": optimizer},
        train_spec=ig.RunSpec(step=train_step, loader=DataLoader(train_set(rt.rank), batch_size=args.batch_size,
                                                                 shuffle=True), metrics={"loss": "loss"}),
        eval_spec={name: ig.RunSpec(step=eval_step, loader=DataLoader(data, batch_size=4),
                                    metrics={"loss": "loss", "accuracy": "correct"})
                   for name, data in [("eval", eval_set()), ("one", TensorDataset(*eval_set()[:1])),
                                     ("empty", TensorDataset(*eval_set()[:0]))]},
        **ig.train_kwargs(args),
    )
    os.makedirs(args.report_dir, exist_ok=True)
    with open(os.path.join(args.report_dir, f"rank{rt.rank}.json"), "w") as f:
        json.dump({"digest": digest(unwrap(net).state_dict(), optimizer), "metrics": metrics,
                   "buffers": buffers(net), "after_last_forward": after_last_forward}, f)


def flags(parser):
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--interrupt-at", type=int, default=-1)
    # Agree on stop signals every step, so the interruption lands on a known step.
    parser.set_defaults(workers=0, batch_size=4, max_epochs=2, stop_check_every=1)


if __name__ == "__main__":
    ig.igniter_main(main, argparse_callback=flags)
