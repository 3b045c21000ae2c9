"""FSDP2 jobs for the sharding tests: the same small model trained under fsdp and DDP side by side.

`train` (2 ranks): trains the model under fsdp and under DDP on the same batches with clipping,
saves both with DCP (`get_state_dict`), loads each into the other strategy, saves and loads through
igniter-dist's checkpoint manager (sync and async), evaluates over uneven shards, checks accumulation,
meta-device init, mixed precision, activation checkpointing with CPU offload, and exports the full
state dict to rank 0. `load` (any world size): loads both checkpoints under fsdp and DDP, evaluates over uneven shards.
`hsdp` (2 nodes x 2 ranks): the same training under hsdp and DDP.
Every rank writes `rank<r>.json`; rank 0 writes the full (gathered) tensors as `.pt` files for the test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from igniter_dist.checkpoint import CheckpointManager
from igniter_dist.data import shard_eval_loader
from igniter_dist.parallel import Strategy, reshard
from igniter_dist.parallel.fsdp import ShardingOptions, shard
from igniter_dist.parallel.lockstep import lockstep
from igniter_dist.runtime import Runtime, exit_process, init_runtime, shutdown_runtime
from igniter_dist.steps import GradientStepper, StepOptions

D_IN, WIDTH, N_OUT, DEPTH = 6, 10, 3, 3  # 10 and 3 rows split unevenly over 3 ranks
STEPS, CLIP, LR = 4, 0.05, 1e-2
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
FSDP_AND_DDP: tuple[Strategy, ...] = ("fsdp", "ddp")
HSDP_AND_DDP: tuple[Strategy, ...] = ("hsdp", "ddp")


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, WIDTH)
        self.blocks = nn.ModuleList([Block(WIDTH) for _ in range(DEPTH)])
        self.head = nn.Linear(WIDTH, N_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def scaled_init(module: nn.Module) -> None:
    """A user `init=`: small normal weights, zero biases, LayerNorm at identity."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def batch(step: int, rank: int, world: int, per_rank: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the global batch of `step` (the same global batch at any world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(per_rank * world, D_IN, generator=g)
    y = torch.randint(0, N_OUT, (per_rank * world,), generator=g)
    return x[rank::world], y[rank::world]


def build(rt: Runtime, strategy: Strategy, seed: int = 0, **options: Any) -> nn.Module:
    torch.manual_seed(seed)
    model = Net()
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model) if rt.distributed else model
    return shard(model, rt, strategy, ShardingOptions(**options))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_numel(t: torch.Tensor) -> int:
    return t.to_local().numel() if isinstance(t, DTensor) else t.numel()


def train(model: nn.Module, rt: Runtime, steps: int = STEPS, scaler: Any = None) -> tuple[Any, dict[str, list]]:
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    log: dict[str, list] = {"loss": [], "norm": [], "output_dtype": []}
    for step in range(steps):
        x, y = batch(step, rt.rank, rt.world_size)
        out = model(x)
        log["output_dtype"].append(str(out.dtype))
        loss = F.cross_entropy(out, y)
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
        log["loss"].append(loss.item())
        log["norm"].append(full(norm).item())
    return optimizer, log


def full_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """Collective: the whole model and optimizer state, on rank 0 (empty elsewhere)."""
    msd, osd = get_state_dict(model, optimizer, options=FULL)
    return {"model": msd, "optim": osd}


def save(model: nn.Module, optimizer: Any, folder: Path) -> None:
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))


def load(model: nn.Module, optimizer: Any, folder: Path) -> None:
    msd, osd = get_state_dict(model, optimizer)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(folder))  # in place, into msd and osd
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def loaded(rt: Runtime, strategy: Strategy, folder: Path) -> dict[str, Any]:
    """Collective: a fresh model (other weights) and optimizer of `strategy`, loaded from `folder`."""
    model = build(rt, strategy, seed=123)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    load(model, optimizer, folder)
    return full_state(model, optimizer)


def shares(model: nn.Module, optimizer: Any) -> dict[str, int]:
    params = list(model.parameters())
    moments = [v for p in params for k, v in optimizer.state[p].items() if k in ("exp_avg", "exp_avg_sq")]
    return {"params_local": sum(local_numel(p) for p in params), "params_total": sum(p.numel() for p in params),
            "adam_local": sum(local_numel(v) for v in moments), "adam_total": sum(v.numel() for v in moments)}


def accumulation(rt: Runtime) -> dict[str, Any]:
    """Two micro-batches through the engine's GradientStepper (--accumulate-grad-batches 2), against one
    backward of the whole batch."""
    micro, whole = build(rt, "fsdp"), build(rt, "fsdp")
    stepper = GradientStepper(StepOptions(accumulate_grad_batches=2), rt, [micro])
    x, y = batch(0, rt.rank, rt.world_size)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, stepper.micro_step(0, None):
        stepper.backward(F.cross_entropy(micro(x[:4]), y[:4]))
    before_last = [e.name for e in prof.events() if "reduce_scatter" in e.name]
    grads_before_last = sum(p.grad is not None for p in micro.parameters())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, stepper.micro_step(1, None):
        stepper.backward(F.cross_entropy(micro(x[4:]), y[4:]))
    at_last = [e.name for e in prof.events() if "reduce_scatter" in e.name]
    F.cross_entropy(whole(x), y).backward()
    grads = {"micro": {n: full(p.grad) for n, p in micro.named_parameters() if p.grad is not None},
             "whole": {n: full(p.grad) for n, p in whole.named_parameters() if p.grad is not None}}
    return {"grads": grads, "reduce_scatters_before_last": len(before_last), "reduce_scatters_at_last": len(at_last),
            "grads_before_last": grads_before_last}


def meta_init(rt: Runtime) -> dict[str, Any]:
    """Meta-built models materialised sharded, next to the same models built eagerly with the same seed."""
    out: dict[str, Any] = {}
    for name, init in (("reset", None), ("init", scaled_init)):
        torch.manual_seed(7)
        with torch.device("meta"):
            model = Net()
        shard(model, rt, "fsdp", ShardingOptions(init=init))
        out[f"{name}_meta"] = get_model_state_dict(model, options=FULL)
        out[f"{name}_local_devices"] = sorted({str(p.to_local().device) if isinstance(p, DTensor) else str(p.device)
                                                for p in model.parameters()})
        torch.manual_seed(7)
        eager = Net()
        if init is not None:
            torch.manual_seed(7)
            for m in eager.modules():
                init(m)
        out[f"{name}_eager"] = eager.state_dict()
    return out


def mixed_precision(rt: Runtime) -> dict[str, Any]:
    """One bf16-mixed and one 16-mixed run: dtypes seen inside the forward, losses, final weights."""
    out: dict[str, Any] = {}
    for precision in ("bf16-mixed", "16-mixed"):
        model = build(rt, "fsdp", precision=precision)
        seen: list[str] = []
        first_block: Any = model.get_submodule("blocks.0")
        first_block.fc.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(str(m.weight.dtype)))
        scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
        optimizer, log = train(model, rt, scaler=scaler)
        out[precision] = {"compute_dtype": seen[0], "output_dtype": log["output_dtype"][0], "loss": log["loss"],
                          "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                          "scale": scaler.get_scale() if scaler else None,
                          "state": full_state(model, optimizer)["model"]}
    return out


def overflow_on_one_rank(rt: Runtime) -> dict[str, Any]:
    """A 16-mixed step through the engine's GradientStepper where only rank 1's gradient shard holds an inf:
    whether this rank's shards changed, and the loss scale after (both ranks must skip and halve it)."""
    model = build(rt, "fsdp", precision="16-mixed")
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    stepper = GradientStepper(StepOptions(precision="16-mixed", grad_clip_norm=CLIP), rt, [model])
    x, y = batch(0, rt.rank, rt.world_size)
    with stepper.micro_step(0, None):
        stepper.backward(F.cross_entropy(model(x), y))
    before = [p.to_local().clone() for p in model.parameters() if isinstance(p, DTensor)]
    if rt.rank == 1:
        grad = next(g for p in model.parameters() if (g := cast(DTensor, p.grad).to_local()).numel())
        grad.view(-1)[0] = float("inf")
    stepper.optimizer_step(optimizer)
    after = [p.to_local() for p in model.parameters() if isinstance(p, DTensor)]
    assert stepper.scaler is not None
    return {"shards": len(before), "changed": sum(not torch.equal(a, b) for a, b in zip(after, before, strict=True)),
            "scale": stepper.scaler.get_scale()}


def through_manager(rt: Runtime, folder: Path) -> dict[str, Any]:
    """An fsdp model saved by the checkpoint manager, synchronously and in the background, and each loaded back."""
    model = build(rt, "fsdp")
    optimizer, _ = train(model, rt, steps=2)
    out = {"saved": full_state(model, optimizer)}
    for mode in ("sync", "async"):
        with CheckpointManager(str(folder / mode), rt, async_save=mode == "async") as manager:
            manager.save(2, {"model": model, "optimizer": optimizer}, per_rank={}, manifest={})
            manager.wait()
            fresh = build(rt, "fsdp", seed=123)
            fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=LR)
            manager.load(2, {"model": fresh, "optimizer": fresh_optimizer})
        out[mode] = full_state(fresh, fresh_optimizer)
    return out


def uneven_evaluation(rt: Runtime) -> dict[str, Any]:
    """Forwards of an fsdp model over evaluation shards of different lengths: sample ids counted, forwards run."""
    model = build(rt, "fsdp")
    model.eval()
    out: dict[str, Any] = {}
    for case, size, sized in (("uneven", 5, True), ("unsized", 5, False), ("empty_rank", 1, True)):
        data = TensorDataset(torch.randn(size, D_IN, generator=torch.Generator().manual_seed(size)), torch.arange(size))
        loader = shard_eval_loader(DataLoader(data, batch_size=1), rt.rank, rt.world_size)
        counted: list[int] = []
        forwards = 0
        with torch.no_grad():
            for (x, ids), is_counted in lockstep(loader if sized else iter(loader), len(loader) if sized else None, rt):
                model(x)  # a collective: every rank must run as many
                forwards += 1
                if is_counted:
                    counted += ids.tolist()
        out[case] = {"counted": counted, "forwards": forwards, "shard": len(loader)}
    reshard(model)  # the root keeps its gathered parameters after a forward
    out["sharded_after"] = all(isinstance(p, DTensor) for p in model.parameters())
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "load", "hsdp"])
    p.add_argument("--dir", required=True, type=Path)
    args = p.parse_args()
    rt = init_runtime("cpu")
    result: dict[str, Any] = {"world_size": rt.world_size}
    tensors: dict[str, Any] = {}
    try:
        if args.mode == "train":
            for strategy in FSDP_AND_DDP:
                model = build(rt, strategy)
                optimizer, result[strategy] = train(model, rt)
                result[strategy].update(shares(model, optimizer))
                tensors[strategy] = full_state(model, optimizer)
                save(model, optimizer, args.dir / f"{strategy}_ckpt")
            tensors["fsdp_from_ddp"] = loaded(rt, "fsdp", args.dir / "ddp_ckpt")
            tensors["ddp_from_fsdp"] = loaded(rt, "ddp", args.dir / "fsdp_ckpt")
            tensors["fsdp_from_fsdp"] = loaded(rt, "fsdp", args.dir / "fsdp_ckpt")
            tensors["manager"] = through_manager(rt, args.dir / "manager")
            result["evaluation"] = uneven_evaluation(rt)
            acc = accumulation(rt)
            tensors["accumulation"] = acc.pop("grads")
            result["accumulation"] = acc
            tensors["meta"] = meta_init(rt)
            tensors["precision"] = mixed_precision(rt)
            result["overflow"] = overflow_on_one_rank(rt)
            model = build(rt, "fsdp", activation_checkpointing=True, cpu_offload=True)
            optimizer, result["ac_offload"] = train(model, rt)
            result["ac_offload"]["param_names"] = [n for n, _ in model.named_parameters()]
            tensors["ac_offload"] = full_state(model, optimizer)
            export = get_model_state_dict(model, options=FULL)  # collective: every rank
            if rt.is_main:
                torch.save(export, args.dir / "model.pt")
        elif args.mode == "load":
            for strategy in FSDP_AND_DDP:
                for source in FSDP_AND_DDP:
                    tensors[f"{strategy}_from_{source}"] = loaded(rt, strategy, args.dir / f"{source}_ckpt")
            tensors["meta"] = meta_init(rt)
            result["evaluation"] = uneven_evaluation(rt)
        else:
            for strategy in HSDP_AND_DDP:
                model = build(rt, strategy)
                optimizer, result[strategy] = train(model, rt)
                result[strategy].update(shares(model, optimizer))
                if strategy == "hsdp":
                    sharded = {n: p for n, p in model.named_parameters() if isinstance(p, DTensor)}
                    result["placements"] = sorted({str(p.placements) for p in sharded.values()})
                    shard_of_mine = {n: p.to_local().clone() for n, p in sharded.items()}
                    torch.save(shard_of_mine, args.dir / f"hsdp_shard_rank{rt.rank}.pt")
                tensors[strategy] = full_state(model, optimizer)
        if rt.is_main:
            torch.save(tensors, args.dir / f"{args.mode}_rank0.pt")
        (args.dir / f"{args.mode}_rank{rt.rank}.json").write_text(json.dumps(result))
        return 0
    finally:
        shutdown_runtime()


if __name__ == "__main__":
    exit_process(main(), distributed=True)
