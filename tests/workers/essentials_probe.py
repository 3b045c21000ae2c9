"""Training essentials under DDP: gradient accumulation, all-reduce counting, divergence for --debug.

Reports final parameters (as lists) and the number of gradient all-reduces DDP issued.
"""

import json
import os

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import igniter_dist as ig
from igniter_dist.values import parse_bool
from igniter_dist.wrapping import unwrap


def main(args):
    rt = ig.runtime()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False)
    model = ig.prepare(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    allreduces = [0]
    if rt.distributed:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            allreduces[0] += 1
            return allreduce_hook(state, bucket)

        assert isinstance(model, nn.parallel.DistributedDataParallel)
        model.register_comm_hook(None, counting_hook)
    step = ig.supervised_step(model, nn.functional.cross_entropy, optimizer)

    def diverging_step(engine, batch):
        out = step(engine, batch)
        if rt.rank == 1 and engine.state.step == 0:
            with torch.no_grad():  # a change to one replica only, behind DDP's back
                bias = unwrap(model).get_parameter("0.bias")
                bias.add_(1.0)
        return out

    ig.train(
        to_save={"model": model, "optimizer": optimizer},
        train_spec=ig.RunSpec(step=diverging_step if args.diverge else step, loader=loader,
                              metrics={"loss": "loss"}),
        **ig.train_kwargs(args),
    )
    os.makedirs(args.report_dir, exist_ok=True)
    params = {k: v.tolist() for k, v in unwrap(model).state_dict().items()}
    with open(os.path.join(args.report_dir, f"rank{rt.rank}.json"), "w") as f:
        json.dump({"params": params, "allreduces": allreduces[0]}, f)


def flags(parser):
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--diverge", type=parse_bool, default=False)
    parser.set_defaults(workers=0, max_epochs=1, checkpoint_dir="none")


if __name__ == "__main__":
    ig.igniter_main(main, argparse_callback=flags)
