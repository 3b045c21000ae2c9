"""Run every benchmark (what `make bench` runs) and write runs/bench/results.md.

    .venv/bin/python benchmarks/run_all.py            # the full set, about 12 minutes on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick    # a smoke check of every script, about 4 minutes

The overhead comparison uses benchmarks/.venv (made by benchmarks/setup_env.sh) for the peers;
without it, only raw PyTorch and igniter-dist run. Nothing here passes or fails on a timing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH, BENCH_PYTHON, OUT, ROOT, child_env, machine

QUICK_NOTE = " (--quick: smoke-check sizes, not measurements)"
PARTS = ("metrics", "overhead", "checkpoint", "sharding", "streams")


def command(part: str, quick: bool) -> list[str]:
    python = sys.executable
    if part == "overhead" and BENCH_PYTHON.exists():
        python = str(BENCH_PYTHON)
    return [python, str(BENCH / part / "bench.py"), *(["--quick"] if quick else [])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Short runs of every benchmark: a smoke check.")
    p.add_argument("--only", default=",".join(PARTS), help=f"Comma-separated subset of {', '.join(PARTS)}.")
    args = p.parse_args()
    parts = [x for x in args.only.split(",") if x]
    if "overhead" in parts and not BENCH_PYTHON.exists():
        print("run_all: benchmarks/.venv is missing, so the peers are skipped; "
              "bash benchmarks/setup_env.sh installs them.", file=sys.stderr)
    before = machine()
    sections, commands = [], []
    started = time.perf_counter()
    for part in parts:
        cmd = command(part, args.quick)
        shown = " ".join(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in cmd)
        print(f"run_all: {shown}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=child_env(), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        commands.append(f"{shown}  # {time.perf_counter() - t0:.0f} s")
        sections.append((OUT / f"{part}.md").read_text())
    after = machine()
    header = (
        f"Measured {before['date']} on {before['cpu']}, {before['cores']} cores, no GPU; "
        f"Python {before['python']}, torch {before['torch']}; one intra-op thread per rank.\n"
        f"Load average (1/5/15 min) before: {before['load_avg_1_5_15']}, after: {after['load_avg_1_5_15']}; "
        f"total {time.perf_counter() - started:.0f} s{QUICK_NOTE if args.quick else ''}.\n\n"
        "```text\n" + "\n".join(commands) + "\n```\n"
    )
    report = header + "\n" + "\n\n".join(s.strip() for s in sections) + "\n"
    (OUT / "results.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
