"""On CUDA: train the digits model with bf16-mixed and torch.compile, and turn on
`torch.cuda.set_sync_debug_mode("error")` for steady-state steps, so any host-device
synchronisation the engine issues per step raises. Logging, evaluation and saving (which read
values back by design) are scheduled outside the checked window. Each rank prints its peak
memory at the end.

    python scripts/gpu_sync_check.py --device cuda --precision bf16-mixed --compile true
    torchrun --nproc-per-node 2 scripts/gpu_sync_check.py --device cuda --precision bf16-mixed --strategy fsdp
"""

import os
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "digits"))
from train import datasets

import igniter_dist as ig

WARMUP, CHECKED = 20, 40


def main(args):
    train_set, _ = datasets(args.data)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, pin_memory=True, drop_last=True)
    model = ig.prepare(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    step = ig.supervised_step(model, nn.functional.cross_entropy, optimizer)

    on_cuda = ig.runtime().device.type == "cuda"  # on CPU (the test suite) the script runs unchecked

    def checked_step(engine, batch):
        if engine.state.step == WARMUP and on_cuda:
            torch.cuda.set_sync_debug_mode("error")
        if engine.state.step == WARMUP + CHECKED:
            if on_cuda:
                torch.cuda.set_sync_debug_mode("default")
                print(f"no host synchronisation in steps {WARMUP}..{WARMUP + CHECKED}", flush=True)
            else:
                print(f"steps {WARMUP}..{WARMUP + CHECKED} ran; synchronisation not checked without CUDA", flush=True)
        return step(engine, batch)

    ig.train(to_save={"model": model, "optimizer": optimizer},
             train_spec=ig.RunSpec(step=checked_step, loader=loader, metrics={"loss": "loss"}),
             **{**ig.train_kwargs(args), "log_every": WARMUP + CHECKED + 1, "save_every": 0, "eval_every": 0})
    rt = ig.runtime()
    if on_cuda:
        print(f"rank {rt.rank} ({args.strategy}): peak memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB",
              flush=True)


if __name__ == "__main__":
    ig.igniter_main(main, inputs={"data": "data"},
                    argparse_callback=lambda p: p.set_defaults(max_epochs=3, batch_size=16, checkpoint_dir="none"))
