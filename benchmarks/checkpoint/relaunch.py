"""Where the time from relaunch to "resumed from" goes, phase by phase (the restart of emergency.py).

Trains the digits example for one epoch on 2 ranks under torchrun (one committed checkpoint), then
relaunches it `--rounds` times through relaunch_worker.py, which notes when each start-up phase
ends on each rank. Prints, per phase, the median time since the launch at which it ended (the
later rank's) and its median duration, beside what a bare interpreter and `import torch` cost now.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint/relaunch.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import OUT, ROOT, child_env, machine, markdown_table, run_logged, torchrun_cmd, write_json

DIGITS = ROOT / "examples" / "digits" / "train.py"
WORKER = Path(__file__).resolve().parent / "relaunch_worker.py"
SCRATCH = OUT / "scratch" / "relaunch"


def example_args(workdir: Path, hidden: int) -> list[str]:
    return ["--max-epochs", "1", "--checkpoint-dir", str(workdir / "checkpoints"), "--output-dir",
            str(workdir / "output"), "--eval-every", "0", "--hidden", str(hidden)]


def relaunch(workdir: Path, hidden: int) -> dict[str, float]:
    """One relaunch: seconds from the launch to the end of each phase, the later rank's."""
    marks = workdir / "marks"
    shutil.rmtree(marks, ignore_errors=True)
    marks.mkdir(parents=True)
    t_launch = time.time()
    p = subprocess.run(torchrun_cmd(sys.executable, WORKER, example_args(workdir, hidden), 2),
                       env=child_env({"RELAUNCH_MARKS": str(marks)}), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"relaunch exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}")
    ranks = [json.loads(f.read_text()) for f in sorted(marks.glob("rank*.json"))]
    if len(ranks) != 2:
        raise RuntimeError(f"expected two ranks' phases, got {len(ranks)}:\n{p.stdout[-3000:]}")
    names = list(ranks[0]["marks"])
    return {name: max(r["marks"][name] for r in ranks) - t_launch for name in names}


def seconds(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env())
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hidden", type=int, default=128, help="Hidden units of the digits MLP (222000: ~200 MB).")
    args = p.parse_args()
    workdir = SCRATCH / f"hidden-{args.hidden}"
    shutil.rmtree(workdir, ignore_errors=True)
    before = machine()
    run_logged(torchrun_cmd(sys.executable, DIGITS, example_args(workdir, args.hidden), 2), workdir / "train.log")
    runs, bare, torch_import = [], [], []
    for _ in range(args.rounds):
        runs.append(relaunch(workdir, args.hidden))
        bare.append(seconds("pass"))
        torch_import.append(seconds("import torch"))
    phases = list(runs[0])
    rows = []
    for name in phases:
        at = statistics.median(r[name] for r in runs)
        took = statistics.median(r[name] - max([0.0] + [r[q] for q in phases[:phases.index(name)]]) for r in runs)
        rows.append([name, f"{at:.2f}", f"{took:.2f}"])
    table = markdown_table(["phase ends (later rank)", "s since launch", "phase s"], rows)
    note = (f"{args.rounds} relaunches of a 2-rank digits job (--hidden {args.hidden}), medians; on this machine now "
            f"a bare `python -c pass` takes {statistics.median(bare):.2f} s and `import torch` "
            f"{statistics.median(torch_import):.2f} s. Load average before {before['load_avg_1_5_15']}, after "
            f"{machine()['load_avg_1_5_15']}.")
    print(note + "\n\n" + table)
    write_json(OUT / "relaunch.json",
               {"machine": before, "rounds": runs, "bare_s": bare, "torch_import_s": torch_import})


if __name__ == "__main__":
    main()
