"""What a checksum over one rank's share would add to a save: hashing 100 MB against writing it.

Two processes at once (as two ranks), each: write + fsync 100 MB (what a plain save of its share
costs), then hash the same bytes in memory with each algorithm; medians over the repetitions,
the order of operations alternating. crc32c and xxhash are measured when installed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/checkpoint/checksum_cost.py --reps 7
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from multiprocessing import Barrier, Process, Queue, queues, synchronize

MB = 100
SAVE_OVER_PLAIN = 0.84  # igniter-dist's local save against a plain write, docs/performance.md


def algorithms() -> dict[str, Callable[[memoryview], object]]:
    algs: dict[str, Callable[[memoryview], object]] = {
        "zlib.crc32": zlib.crc32, "zlib.adler32": zlib.adler32,
        "hashlib.blake2b": lambda b: hashlib.blake2b(b).digest(),
    }
    optional = {"crc32c (hardware, extra package)": ("crc32c", "crc32c"),
                "xxhash.xxh3_64 (extra package)": ("xxhash", "xxh3_64_intdigest")}
    for label, (module, function) in optional.items():
        try:
            algs[label] = getattr(importlib.import_module(module), function)
        except ImportError:
            pass
    return algs


Times = dict[str, list[float]]


def worker(rank: int, reps: int, barrier: synchronize.Barrier, results: queues.Queue[tuple[int, Times]],
           folder: str) -> None:
    data = memoryview(os.urandom(MB * 1024 * 1024))
    algs = algorithms()
    times: Times = {name: [] for name in ["plain write + fsync", *algs]}

    def timed(name: str, fn: Callable[[], object], keep: bool) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        fn()
        barrier.wait()
        if keep:
            times[name].append(time.perf_counter() - t0)

    def write(path: str) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    for rep in range(reps + 1):  # repetition 0 warms up
        path = os.path.join(folder, f"rank{rank}_{rep}.bin")
        steps = [("plain write + fsync", lambda p=path: write(p))]
        steps += [(name, lambda fn=fn: fn(data)) for name, fn in algs.items()]
        for name, fn in steps if rep % 2 else reversed(steps):
            os.sync()
            timed(name, fn, keep=rep > 0)
        os.remove(path)
    results.put((rank, times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    barrier = Barrier(2)
    results: queues.Queue[tuple[int, Times]] = Queue()
    with tempfile.TemporaryDirectory() as folder:
        procs = [Process(target=worker, args=(r, args.reps, barrier, results, folder)) for r in range(2)]
        for proc in procs:
            proc.start()
        times = dict(results.get() for _ in procs)[0]
        for proc in procs:
            proc.join()
    plain = statistics.median(times.pop("plain write + fsync"))
    print(f"load average {os.getloadavg()}, {args.reps} repetitions, 2 processes x {MB} MB")
    print(f"plain write + fsync: {plain * 1e3:.1f} ms")
    for name, values in times.items():
        m = statistics.median(values)
        ratio = plain / (plain / SAVE_OVER_PLAIN + m)
        print(f"{name}: {m * 1e3:.1f} ms ({MB / m:,.0f} MB/s); a save at {SAVE_OVER_PLAIN} of a plain write "
              f"would fall to {ratio:.2f}")


if __name__ == "__main__":
    main()
