"""Write a synthetic streaming data set: JSONL or .npy shards under a folder or an s3:// prefix.

    python examples/streaming/make_shards.py shards                       # 8 train + 2 eval JSONL shards
    python examples/streaming/make_shards.py s3://bucket/shards --format npy

Each record is 16 features and a label from a fixed linear rule, so the example learns something.
The layout the training script reads: `<prefix>/train/*.<fmt>` and `<prefix>/eval/*.<fmt>`.
"""

import argparse
import io
import json

import fsspec
import numpy as np

FEATURES = 16


def records(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, FEATURES)).astype(np.float32)
    rule = np.random.default_rng(0).standard_normal((FEATURES, 4))  # the same rule for every shard
    return x, (x @ rule).argmax(axis=1)


def write_shard(fs, path: str, x: np.ndarray, y: np.ndarray, fmt: str) -> None:
    if fmt == "jsonl":
        lines = "".join(json.dumps({"x": [round(float(v), 6) for v in row], "y": int(label)}) + "\n"
                        for row, label in zip(x, y, strict=True))
        fs.pipe(path, lines.encode())
    else:  # one (n, FEATURES + 1) float32 array, the label last
        buffer = io.BytesIO()
        np.save(buffer, np.concatenate([x, y[:, None].astype(np.float32)], axis=1))
        fs.pipe(path, buffer.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prefix", help="A folder or an fsspec URL (s3://bucket/prefix).")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "npy"])
    p.add_argument("--train-shards", type=int, default=8)
    p.add_argument("--eval-shards", type=int, default=2)
    p.add_argument("--records", type=int, default=256, help="Records per shard.")
    args = p.parse_args()
    fs, root = fsspec.core.url_to_fs(args.prefix)
    for split, n, offset in (("train", args.train_shards, 0), ("eval", args.eval_shards, 10_000)):
        fs.makedirs(f"{root}/{split}", exist_ok=True)
        for i in range(n):
            x, y = records(offset + i, args.records)
            write_shard(fs, f"{root}/{split}/shard-{i:05d}.{args.format}", x, y, args.format)
    print(f"wrote {args.train_shards} train and {args.eval_shards} eval shards of {args.records} records "
          f"to {args.prefix}")


if __name__ == "__main__":
    main()
