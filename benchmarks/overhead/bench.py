"""Step-time overhead against a raw DDP loop and the peers, at 1 and 2 ranks, for each workload.

    benchmarks/.venv/bin/python benchmarks/overhead/bench.py            # the full run (6 rounds)
    benchmarks/.venv/bin/python benchmarks/overhead/bench.py --quick    # a smoke check

Peers come from benchmarks/.venv (bash benchmarks/setup_env.sh); without it only raw and
igniter-dist run. Each (workload, ranks) pair is one torchrun job (see worker.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import (
    BENCH_PYTHON,
    OUT,
    RAW,
    machine,
    markdown_table,
    median_of,
    ratios,
    run_logged,
    spread,
    torchrun_cmd,
    write_json,
)

WORKER = Path(__file__).resolve().parent / "worker.py"
# (warm-up steps, timed steps) per run
FULL = {"mlp": (30, 150), "cnn": (5, 25), "tiny": (100, 600)}
QUICK = {"mlp": (10, 30), "cnn": (2, 6), "tiny": (20, 60)}
NAMES = {
    RAW: "raw PyTorch DDP loop",
    "igniter": "igniter-dist (metrics + console)",
    "igniter+ckpt": "igniter-dist + checkpoint every 1/4 run",
    "fabric": "Lightning Fabric",
    "trainer": "Lightning Trainer",
    "ignite": "pytorch-ignite",
    "accelerate": "Accelerate",
}


def python() -> str:
    return str(BENCH_PYTHON) if BENCH_PYTHON.exists() else sys.executable


def run(workloads: list[str], ranks: list[int], rounds: int, quick: bool, impls: str | None) -> dict:
    steps = QUICK if quick else FULL
    results = []
    for workload in workloads:
        for nproc in ranks:
            warmup, timed = steps[workload]
            out = OUT / f"overhead-{workload}-{nproc}.json"
            args = ["--workload", workload, "--rounds", str(rounds), "--warmup", str(warmup),
                    "--steps", str(timed), "--out", str(out)] + (["--impls", impls] if impls else [])
            print(f"overhead: {workload}, {nproc} rank(s), {rounds} round(s) ...", file=sys.stderr, flush=True)
            run_logged(torchrun_cmd(python(), WORKER, args, nproc), out.with_suffix(".log"))
            results.append(json.loads(out.read_text()))
    return {"machine": machine(), "python": python(), "results": results}


def summarize(data: dict) -> str:
    """One markdown table per workload: ratios to raw and framework time per iteration, by ranks."""
    parts = []
    by_workload: dict[str, list[dict]] = {}
    for r in data["results"]:
        by_workload.setdefault(r["workload"], []).append(r)
    for workload, results in by_workload.items():
        results.sort(key=lambda r: r["world_size"])
        headers = ["implementation"]
        for r in results:
            n = r["world_size"]
            headers += [f"{n}r step ms", f"{n}r ratio (range)", f"{n}r mean ratio", f"{n}r framework us"]
        impls = [RAW] + [i for i in NAMES if i != RAW and any(run["impl"] == i for r in results for run in r["runs"])]
        rows = []
        for impl in impls:
            row = [NAMES[impl] + (" (noise floor)" if impl == RAW else "")]
            for r in results:
                med = ratios(r["runs"], "median_s").get(impl, [])
                mean = ratios(r["runs"], "mean_s").get(impl, [])
                step = median_of(r["runs"], impl, "median_s")
                fw = median_of(r["runs"], impl, "framework_us")
                coll = median_of(r["runs"], impl, "collective_us") or 0.0
                fw_cell = "-" if fw is None else f"{fw:.1f}" + (f" ({coll:.0f} in collectives)" if coll >= 0.5 else "")
                row += [f"{step * 1e3:.3f}" if step else "-", spread(med), spread(mean), fw_cell]
            rows.append(row)
        r0 = results[0]
        parts.append(
            f"### {workload}: {r0['warmup']} warm-up + {r0['steps']} timed steps per run, {r0['rounds']} round(s)\n\n"
            + markdown_table(headers, rows)
            + ("\n\nSkipped (not installed): " + ", ".join(r0["skipped"]) if r0["skipped"] else "")
        )
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="One short round: a smoke check, not a measurement.")
    p.add_argument("--rounds", type=int, default=None, help="Interleaved rounds (default 6, --quick 1).")
    p.add_argument("--workloads", default="mlp,cnn,tiny")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--impls", default=None, help="Comma-separated subset (raw always runs).")
    args = p.parse_args()
    rounds = args.rounds or (1 if args.quick else 6)
    data = run(args.workloads.split(","), [int(n) for n in args.ranks.split(",")], rounds, args.quick, args.impls)
    write_json(OUT / "overhead.json", data)
    table = summarize(data)
    (OUT / "overhead.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
