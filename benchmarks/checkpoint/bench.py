"""Checkpoint bandwidth (local folder and S3 on moto's server), async blocking, emergency save, resume.

    .venv/bin/python benchmarks/checkpoint/bench.py            # ~200 MB state, 3 repetitions
    .venv/bin/python benchmarks/checkpoint/bench.py --quick    # ~20 MB, 1 repetition: a smoke check
    .venv/bin/python benchmarks/checkpoint/bench.py --storages local --emergency-hidden "" --direct-read false

Runs in the project's environment (s3fs, moto, scikit-learn for the digits example).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import emergency
from harness import OUT, machine, markdown_table, run_logged, torchrun_cmd, write_json

WORKER = Path(__file__).resolve().parent / "worker.py"
SCRATCH = OUT / "scratch" / "checkpoint"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


class MotoS3:
    """moto's S3 server on a free loopback port, with one fresh bucket."""

    def __enter__(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        os.environ.update(self.env)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        self.bucket = f"bench-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem().mkdir(self.bucket)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


def run_worker(name: str, url: str, megabytes: float, reps: int, env: dict[str, str] | None = None,
               direct_read: str = "true") -> dict:
    out = OUT / f"checkpoint-{name}.json"
    args = ["--url", url, "--megabytes", str(megabytes), "--reps", str(reps), "--out", str(out),
            "--direct-read", direct_read]
    print(f"checkpoint: {name}, {megabytes:.0f} MB, {reps} repetition(s) ...", file=sys.stderr, flush=True)
    run_logged(torchrun_cmd(sys.executable, WORKER, args, 2), out.with_suffix(".log"), env=env)
    return json.loads(out.read_text())


def run(quick: bool, storages: list[str], emergency_hidden: list[int], direct_read: str = "true") -> dict:
    megabytes = 20.0 if quick else 200.0
    # Local writes are bimodal (page-cache throttling): more repetitions; moto is slow: fewer.
    reps = {"local": 1, "s3": 1} if quick else {"local": 9, "s3": 2}
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    data: dict = {"machine": machine(), "bandwidth": {}, "emergency": []}
    if "local" in storages:
        data["bandwidth"]["local"] = run_worker("local", str(SCRATCH / "local"), megabytes, reps["local"],
                                                direct_read=direct_read)
    if "s3" in storages:
        with MotoS3() as s3:
            data["bandwidth"]["s3"] = run_worker("s3", f"s3://{s3.bucket}/run", megabytes, reps["s3"], env=s3.env,
                                                 direct_read=direct_read)
    for hidden in emergency_hidden:
        print(f"checkpoint: SIGTERM of digits --hidden {hidden} ...", file=sys.stderr, flush=True)
        workdir = SCRATCH / f"emergency-{hidden}"
        workdir.mkdir(parents=True)
        data["emergency"].append(emergency.measure(workdir, hidden))
    shutil.rmtree(SCRATCH, ignore_errors=True)
    return data


def _med(values: list[float]) -> float:
    return statistics.median(values)


def _time_and_rate(seconds: float, megabytes: float) -> str:
    return f"{seconds:.3f} s ({megabytes / seconds:,.0f} MB/s)"


def summarize(data: dict) -> str:
    parts = []
    bw = data["bandwidth"]
    if bw:
        names = {"local": "local folder", "s3": "S3 (moto server, loopback)"}
        cols = [k for k in ("local", "s3") if k in bw]
        some = bw[cols[0]]
        mb = some["state_bytes"] / 1e6
        rows = []

        def row(label: str, fn) -> None:
            rows.append([label] + [fn(bw[c]["results"], c) for c in cols])

        row("plain write, same bytes (local: write + fsync; S3: fs.pipe)",
            lambda r, c: _time_and_rate(_med(r["plain_write_s"]), mb))
        row("igniter-dist save (sync)", lambda r, c: _time_and_rate(_med(r["save_s"]), mb))
        row("**save bandwidth / plain** (target >= 0.80)",
            lambda r, c: f"**{_med(r['plain_write_s']) / _med(r['save_s']):.2f}**")
        row("plain read, same bytes (local: readinto torch-allocated buffers; S3: fs.cat)",
            lambda r, c: _time_and_rate(_med(r["plain_read_s"]), mb))
        row("igniter-dist load", lambda r, c: _time_and_rate(_med(r["load_s"]), mb))
        row("**load bandwidth / plain** (target >= 0.80)",
            lambda r, c: f"**{_med(r['plain_read_s']) / _med(r['load_s']):.2f}**")
        row("plain read into fresh memory (local: f.read())",
            lambda r, c: _time_and_rate(_med(r["plain_read_new_s"]), mb) if "plain_read_new_s" in r else "-")
        row("load bandwidth / fresh-memory read",
            lambda r, c: f"{_med(r['plain_read_new_s']) / _med(r['load_s']):.2f}" if "plain_read_new_s" in r else "-")
        row("async save: loop blocked", lambda r, c: f"{_med(r['async_blocking_s']):.3f} s")
        row("async save: until written and committed", lambda r, c: f"{_med(r['async_total_s']):.3f} s")
        row("**async blocked / sync save** (S3 target <= 0.10)",
            lambda r, c: f"**{_med(r['async_blocking_s']) / _med(r['save_s']):.2f}**")
        row("resume: find latest + load", lambda r, c: f"{_med(r['resume_s']):.3f} s")
        reps = "/".join(str(bw[c]["reps"]) for c in cols)
        parts.append(f"### Save and load: {mb:.0f} MB (model + Adam), 2 ranks, median of {reps} repetitions\n\n"
                     + markdown_table(["", *(names[c] for c in cols)], rows))
    if data["emergency"]:
        rows = [[f"digits --hidden {e['hidden']} ({e['checkpoint_mb']:.1f} MB checkpoint, "
                 f"{(e.get('seconds_per_step') or 0) * 1e3:.0f} ms/step)",
                 f"{e['signal_to_commit_s']:.2f} s",
                 "-" if e.get("reported_save_s") is None else f"{e['reported_save_s']:.2f} s",
                 f"{e['commit_to_exit_s']:.2f} s", f"{e['signal_to_exit_s']:.2f} s",
                 f"{e['saved_step']} (signal after step {e.get('signal_after_step', 10)})",
                 f"{e['relaunch_to_resumed_s']:.1f} s"] for e in data["emergency"]]
        parts.append("### SIGTERM to a 2-rank torchrun job, and the restart\n\n" + markdown_table(
            ["job", "signal -> checkpoint committed", "save duration it reports", "committed -> job exited",
             "signal -> exited",
             "step saved", "relaunch -> resumed"], rows))
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="A small state and one repetition: a smoke check.")
    p.add_argument("--storages", default="local,s3")
    p.add_argument("--emergency-hidden", default=None,
                   help="Hidden sizes of the digits MLP for the SIGTERM runs (default 128 and ~200 MB of state; "
                        "--quick: 128); empty for none.")
    p.add_argument("--direct-read", choices=["true", "false"], default="true",
                   help="false: local loads go through DCP's own reader, to measure what direct reads gain.")
    args = p.parse_args()
    hidden = args.emergency_hidden if args.emergency_hidden is not None else ("128" if args.quick else "128,222000")
    data = run(args.quick, args.storages.split(","), [int(h) for h in hidden.split(",") if h], args.direct_read)
    write_json(OUT / "checkpoint.json", data)
    table = summarize(data)
    (OUT / "checkpoint.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
