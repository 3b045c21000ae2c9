"""The README's plain step (`optimizer.zero_grad(); loss.backward(); optimizer.step()`) under the step flags.

`--variants` trains several configurations one after the other in this process (a fresh model each
time, the same seed and data), so one launch compares them; each rank reports every variant's final
parameters and how many optimizer steps really ran. `--single STYLE` trains once with the flags
given (`plain`, or `foreign`: the plain step also steps an optimizer that is not in to_save).
`plain_zero` is the plain step with `model.zero_grad()` (the DDP wrapper and the module inside)
between backward and step.
"""

import json
import os
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import igniter_dist as ig
from igniter_dist.wrapping import unwrap

# name: (batch size, --accumulate-grad-batches, --grad-clip-norm, step style)
VARIANTS = {
    "big": (12, 1, None, "plain"),
    "helpers3": (4, 3, None, "helpers"),
    "plain3": (4, 3, None, "plain"),
    "plain3_zero": (4, 3, None, "plain_zero"),
    "helpers3_clip": (4, 3, 0.01, "helpers"),
    "plain3_clip": (4, 3, 0.01, "plain"),
}


def data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def train(args, batch: int, step_style: str, **flags):
    torch.manual_seed(args.seed)
    model = ig.prepare(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    stepped = [0]
    optimizer.register_step_post_hook(lambda *_: stepped.__setitem__(0, stepped[0] + 1))
    other = torch.optim.SGD(model.parameters(), lr=0.0)  # stepped by the "foreign" step, never in to_save

    def train_step(engine, batch):
        x, y = batch
        model.train()
        if step_style == "helpers":
            loss = nn.functional.cross_entropy(model(x), y)
            engine.backward(loss)
            engine.optimizer_step(optimizer)
            return {"loss": loss}
        optimizer.zero_grad()  # the README's step, word for word
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if step_style == "plain_zero":  # mid-window these would wipe the gradients accumulated so far
            model.zero_grad()
            unwrap(model).zero_grad()
        if step_style == "foreign":
            other.step()
        optimizer.step()
        return {"loss": loss}

    kwargs = {**ig.train_kwargs(args), "console": False, **flags}
    ig.train(to_save={"model": model, "optimizer": optimizer},
             train_spec=ig.RunSpec(step=train_step, loader=DataLoader(data(args.n_samples), batch_size=batch),
                                   metrics={"loss": "loss"}),
             **kwargs)
    if stepped[0]:
        print(f"rank {ig.runtime().rank}: the optimizer stepped {stepped[0]} times", file=sys.stderr, flush=True)
    return {"params": {k: v.tolist() for k, v in unwrap(model).state_dict().items()}, "steps": stepped[0]}


def main(args):
    if args.single:
        train(args, 4, args.single)
        return
    report = {}
    for name in args.variants.split(","):
        batch, k, clip, style = VARIANTS[name]
        report[name] = train(args, batch, style, accumulate_grad_batches=k, grad_clip_norm=clip)
    os.makedirs(args.report_dir, exist_ok=True)
    with open(os.path.join(args.report_dir, f"rank{ig.runtime().rank}.json"), "w") as f:
        json.dump(report, f)


def flags(parser):
    parser.add_argument("--report-dir", default=".")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--single", choices=["plain", "foreign"])
    parser.add_argument("--n-samples", type=int, default=48)
    parser.set_defaults(workers=0, max_epochs=2, checkpoint_dir="none")


if __name__ == "__main__":
    ig.igniter_main(main, argparse_callback=flags)
