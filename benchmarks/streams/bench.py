"""Relaunch to first training step, resuming a 2-rank stream at a late position against an early one.

Three checkpoints of the same job (benchmarks/streams/worker.py, an endless stream, batch 1024 per
rank): after 1 step (position 1,024 per rank), after `--late-steps` steps (about 10^6 samples per
rank) with the dataset keeping its position, and the same late step without one (read and drop).
Each round relaunches from a fresh copy of each checkpoint, one more step, and times from the
launch to rank 0's first training step. Results: runs/bench/streams.md and .json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import OUT, machine, markdown_table, run_logged, torchrun_cmd, write_json

WORKER = Path(__file__).resolve().parent / "worker.py"
BATCH = 1024


def job(ckpt: Path, steps: int, stateful: bool, log: Path, first_step_file: Path | None = None) -> None:
    args = ["--checkpoint-dir", str(ckpt), "--output-dir", str(ckpt.parent / "out"), "--max-steps", str(steps),
            "--stateful", str(stateful).lower(), "--batch-size", str(BATCH)]
    if first_step_file is not None:
        args += ["--first-step-file", str(first_step_file)]
    run_logged(torchrun_cmd(sys.executable, WORKER, args, 2), log)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--late-steps", type=int, default=977, help="Steps to the late position (977 x 1024 = 10^6).")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="50 late steps, 1 round: a smoke check.")
    args = p.parse_args()
    if args.quick:
        args.late_steps, args.rounds = 50, 1
    work = OUT / "streams"
    shutil.rmtree(work, ignore_errors=True)
    cases = {"early (position 1,024)": (1, True),
             f"late (position {args.late_steps * BATCH:,})": (args.late_steps, True),
             f"late, no position kept (re-reads {args.late_steps} batches)": (args.late_steps, False)}
    saved = {}
    for i, (name, (steps, stateful)) in enumerate(cases.items()):
        saved[name] = work / f"case{i}" / "ckpt"
        job(saved[name], steps, stateful, work / f"case{i}" / "setup.log")
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.rounds):
        for i, (name, (steps, stateful)) in enumerate(cases.items()):  # interleaved: load drifts hit all alike
            run = work / f"case{i}" / f"round{r}"
            shutil.copytree(saved[name], run / "ckpt")
            stamp = run / "first_step.txt"
            t0 = time.time()
            job(run / "ckpt", steps + 1, stateful, run / "relaunch.log", stamp)
            if "resumed from" not in (run / "relaunch.log").read_text():
                raise RuntimeError(f"{run / 'relaunch.log'} did not resume")
            times[name].append(float(stamp.read_text()) - t0)
    early = statistics.median(times[next(iter(cases))])
    rows = [[name, f"{statistics.median(t):.2f}", " ".join(f"{x:.2f}" for x in t),
             f"{statistics.median(t) / early:.2f}x"] for name, t in times.items()]
    table = markdown_table(["resumed at", "median s", "rounds (s)", "vs early"], rows)
    env = machine()
    text = (f"### Relaunch to the first step of a resumed stream, 2 ranks, batch {BATCH} per rank, "
            f"median of {args.rounds} round(s)\n\n{table}\n\nLoad average before: {env['load_avg_1_5_15']}.\n")
    (OUT / "streams.md").write_text(text)
    write_json(OUT / "streams.json", {"machine": env, "late_steps": args.late_steps, "times_s": times})
    print(text)


if __name__ == "__main__":
    main()
