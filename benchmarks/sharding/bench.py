"""Sharded training: per-rank memory and step time of fsdp against ddp, sharded checkpoint bandwidth.

    .venv/bin/python benchmarks/sharding/bench.py            # the GPT example at 4 layers x 512 (and x 1024), 2 ranks
    .venv/bin/python benchmarks/sharding/bench.py --quick    # 2 layers x 128, 1 round: a smoke check
    .venv/bin/python benchmarks/sharding/bench.py --ckpt-width 2048 --reps 5   # checkpoints of 1.2 GB per rank

Runs in the project's environment.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import OUT, machine, markdown_table, run_logged, torchrun_cmd, write_json  # noqa: E402

WORKER = Path(__file__).resolve().parent / "worker.py"
SCRATCH = OUT / "scratch" / "sharding"


def run(quick: bool, ckpt_width: int | None, reps: int | None) -> dict:
    size = ["--layers", "2", "--width", "128", "--steps", "2", "--rounds", "1", "--reps", "1", "--ckpt-layers", "2",
            "--ckpt-width", "256"] if quick else []
    size += ["--ckpt-width", str(ckpt_width)] if ckpt_width else []
    size += ["--reps", str(reps)] if reps else []
    out = OUT / "sharding-run.json"
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    print("sharding: ddp and fsdp on 2 ranks ...", file=sys.stderr, flush=True)
    run_logged(torchrun_cmd(sys.executable, WORKER, [*size, "--url", str(SCRATCH), "--out", str(out)], 2),
               out.with_suffix(".log"))
    shutil.rmtree(SCRATCH, ignore_errors=True)
    return {"machine": machine(), **json.loads(out.read_text())}


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _spread(seconds: list[float]) -> str:
    """The median and the range of a timing's repetitions."""
    return f"{statistics.median(seconds):.3f} s ({min(seconds):.3f}-{max(seconds):.3f})"


def summarize(data: dict) -> str:
    c = data["config"]
    ranks = data["ranks"]
    per_rank = {s: [sum(r["memory"][s].values()) for r in ranks] for s in ("ddp", "fsdp")}
    rows = []
    for part in ("params", "grads", "optimizer"):
        rows.append([part] + [" / ".join(_mb(r["memory"][s][part]) for r in ranks) for s in ("ddp", "fsdp")])
    worst = {s: max(v) for s, v in per_rank.items()}
    rows.append(["**total, per rank**"] + [" / ".join(_mb(v) for v in per_rank[s]) for s in ("ddp", "fsdp")])
    memory = markdown_table(["bytes per rank (rank 0 / rank 1)", "ddp", "fsdp"], rows)
    ratio = worst["fsdp"] / worst["ddp"]
    step = data["median_step_s"]
    ck = data["checkpoint"]
    med = {k: statistics.median(v) for k, v in ck.items()}
    shard_mb = max(r["shard_bytes"] for r in ranks) / 1e6
    lines = [
        f"### Sharded training: the GPT example ({c['layers']} layers x {c['width']}, {data['parameters']:,} "
        f"parameters), Adam, {data['world_size']} ranks",
        "", memory, "",
        markdown_table(["", "value"], [
            ["**fsdp / ddp bytes per rank** (params + grads + Adam; target <= 0.55)", f"**{ratio:.2f}**"],
            [f"step time, median of {c['rounds']} interleaved rounds x {c['steps']} steps (ddp / fsdp)",
             f"{step['ddp'] * 1e3:.0f} ms / {step['fsdp'] * 1e3:.0f} ms"],
            ["**fsdp / ddp step time**", f"**{step['fsdp'] / step['ddp']:.2f}**"],
            [f"checkpointed model: {c['ckpt_layers']} layers x {c['ckpt_width']}, {data['ckpt_parameters']:,} "
             f"parameters + Adam, {shard_mb:.0f} MB per rank", ""],
            ["plain write of each rank's shards, write + fsync", _spread(ck["plain_write_s"])],
            ["sharded save (checkpoint manager, sync)", _spread(ck["save_s"])],
            ["**save bandwidth / plain** (target >= 0.80)", f"**{med['plain_write_s'] / med['save_s']:.2f}**"],
            ["plain read of each rank's shards (readinto a torch-allocated buffer)", _spread(ck["plain_read_s"])],
            ["sharded load (into the live shards)", _spread(ck["load_s"])],
            ["**load bandwidth / plain** (target >= 0.80)", f"**{med['plain_read_s'] / med['load_s']:.2f}**"],
            ["plain read from the disk (files dropped from the page cache first)", _spread(ck["plain_read_cold_s"])],
            ["sharded load from the disk", _spread(ck["load_cold_s"])],
            ["**load from the disk / plain**", f"**{med['plain_read_cold_s'] / med['load_cold_s']:.2f}**"],
        ]),
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="A tiny model and one round: a smoke check.")
    p.add_argument("--ckpt-width", type=int, help="Width of the checkpointed model (default 1024: 306 MB per rank; "
                                                   "2048: 1.2 GB per rank).")
    p.add_argument("--reps", type=int, help="Timed save/load repetitions (default 3).")
    args = p.parse_args()
    data = run(args.quick, args.ckpt_width, args.reps)
    name = f"sharding-w{args.ckpt_width}" if args.ckpt_width else "sharding"
    write_json(OUT / f"{name}.json", data)
    table = summarize(data)
    (OUT / f"{name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
