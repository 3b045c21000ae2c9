"""Streams and --max-steps: exact step counts, exact resume that reads nothing twice, uneven ends agreed.

The 2-rank runs use tests/workers/stream_probe.py: sample i is a fixed function of i, each rank
reads its share through ig.shard_iterable, and every sample the dataset reads is logged.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from igniter_dist.args import build_parser, parse_args, train_kwargs
from igniter_dist.data import shard_iterable
from igniter_dist.runtime import Runtime
from igniter_dist.streams import Stream
from igniter_dist.tracking.base import Progress
from igniter_dist.tracking.console import ConsoleSink
from launch import ROOT, check, python, torchrun

PROBE = ROOT / "tests" / "workers" / "stream_probe.py"
BATCH = 4  # the probe's batch size per rank
STEPS = 12


def probe_args(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["--report-dir", str(tmp / name), "--checkpoint-dir", str(tmp / "ckpt"), "--output-dir",
            str(tmp / "out"), *extra]


def reports(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def reads(folder: Path, rank: int) -> list[int]:
    """Every sample rank `rank` read, in the order each reading process read them."""
    return [int(x) for p in sorted(folder.glob(f"reads_rank{rank}_*.txt")) for x in p.read_text().split()]


def committed_steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in ckpt.glob("step_*") if (p / "manifest.json").exists())


def logged(out: Path, key: str) -> list[tuple[int, int, float]]:
    """(step, epoch, value) of every metrics.jsonl record holding `key`."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["epoch"], r[key]) for r in rows if key in r]


# ---------------------------------------------------------------- an endless stream, --max-steps

ENDLESS = ("--max-steps", str(STEPS), "--save-every", "4steps", "--count-reads", "true")


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """The uninterrupted 2-rank run of an endless stream that keeps its position."""
    tmp = tmp_path_factory.mktemp("endless")
    check(torchrun(PROBE, probe_args(tmp, "r", *ENDLESS)))
    return tmp


def test_an_endless_stream_trains_exactly_max_steps_and_reads_nothing_more(endless):
    r0, r1 = reports(endless / "r")
    assert r0["digest"] == r1["digest"]
    for rank, report in enumerate((r0, r1)):
        share = list(range(rank, 2 * STEPS * BATCH, 2))  # its ig.shard_iterable share, in order
        assert report["seen"] == share
        assert reads(endless / "r", rank) == share  # the batch read ahead stops at the last step
    assert committed_steps(endless / "ckpt") == [8, 12]  # every 4 steps, the last one saved once
    assert logged(endless / "out", "train/count") == [(STEPS, 1, 2.0 * STEPS * BATCH)]


def interrupt_and_resume(tmp: Path, *extra: str, at: int | None = None) -> tuple[int, list[dict], str]:
    """SIGTERM from rank 0 after step `at` (default: a random one), then the same command: the step saved,
    the final reports and the resumed run's stderr."""
    at = random.randint(2, STEPS - 4) if at is None else at
    first = torchrun(PROBE, probe_args(tmp, "first", *extra, "--interrupt-at", str(at)))
    assert first.returncode != 0 and first.stderr.count("exiting with 143") == 2, first.stderr[-3000:]
    saved = committed_steps(tmp / "ckpt")[-1]
    assert at <= saved <= at + 2, (at, saved)
    second = check(torchrun(PROBE, probe_args(tmp, "second", *extra)))
    assert f"resumed from {tmp / 'ckpt'}/step_{saved:010d}" in second.stderr
    return saved, reports(tmp / "second"), second.stderr


def test_sigterm_then_resume_is_bitwise_identical_and_reads_only_what_is_left(tmp_path, endless):
    reference = reports(endless / "r")
    saved, resumed, _ = interrupt_and_resume(tmp_path, *ENDLESS)
    for rank in range(2):
        assert resumed[rank]["digest"] == reference[rank]["digest"], f"saved at step {saved}"
        rest = reference[rank]["seen"][saved * BATCH:]
        assert resumed[rank]["seen"] == rest
        assert reads(tmp_path / "second", rank) == rest  # each sample it still needed, and nothing else
        assert not set(reads(tmp_path / "second", rank)) & set(reference[rank]["seen"][:saved * BATCH])


def test_a_stream_without_position_is_re_read_with_one_warning_and_still_resumes_bitwise(tmp_path, endless):
    reference = reports(endless / "r")
    saved, resumed, stderr = interrupt_and_resume(tmp_path, *ENDLESS, "--stateful", "false")
    assert [r["digest"] for r in resumed] == [r["digest"] for r in reference]
    assert stderr.count(f"so each rank re-reads {saved} batches it trained on already") == 1
    for rank in range(2):
        assert reads(tmp_path / "second", rank) == reference[rank]["seen"]  # from the start of the pass again
        assert resumed[rank]["seen"] == reference[rank]["seen"][saved * BATCH:]


def test_per_rank_stream_state_refuses_another_world_size_and_harms_no_checkpoint(tmp_path, endless):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(endless / "ckpt", ckpt)
    before = sorted((p.relative_to(ckpt), p.stat().st_size) for p in ckpt.rglob("*"))
    result = python(PROBE, probe_args(tmp_path, "one", *ENDLESS, "--max-steps", "20"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert ("This checkpoint holds the training stream's position on each of its 2 ranks, which cannot be shared "
            "out over 1; resume it with 2 ranks, or start a new run in another --checkpoint-dir.") in result.stderr
    assert sorted((p.relative_to(ckpt), p.stat().st_size) for p in ckpt.rglob("*")) == before


# ---------------------------------------------------------------- uneven ends, uneven evaluation


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """Rank 0's stream holds 40 samples a pass, rank 1's 28 (10 and 7 batches); evaluation 37 samples."""
    tmp = tmp_path_factory.mktemp("uneven")
    check(torchrun(PROBE, probe_args(tmp, "r", "--max-epochs", "2", "--rank-samples", "40,28",
                                     "--eval-samples", "37"), timeout=240))
    return tmp


def test_the_first_rank_to_run_out_ends_the_epoch_for_all_without_losing_a_metric(uneven):
    # Epoch 1 ends after rank 1's 7 batches; in epoch 2 rank 0 goes on with its last 3 (the one it read
    # ahead included) while rank 1 starts a new pass, and rank 0's end closes the epoch.
    assert logged(uneven / "out", "train/count") == [(7, 1, 2.0 * 7 * BATCH), (10, 2, 2.0 * 3 * BATCH)]
    r0, r1 = reports(uneven / "r")
    assert r0["digest"] == r1["digest"]
    assert r0["seen"] == list(range(0, 80, 2))  # each of its 40 samples once
    assert r1["seen"] == list(range(1, 56, 2)) + list(range(1, 24, 2))  # 28, then the new pass's first 12


def test_an_uneven_evaluation_stream_counts_every_sample_once(uneven):
    # 37 samples: rank 0 evaluates 19, rank 1 18; the count is global and the mean index exact.
    assert logged(uneven / "out", "eval/count") == [(7, 1, 37.0), (10, 2, 37.0)]
    assert [v for _, _, v in logged(uneven / "out", "eval/idx")] == [18.0, 18.0]


# ---------------------------------------------------------------- --max-steps with map-style data

MAP = ("--data", "map", "--max-steps", "15", "--eval-samples", "11")  # 6 steps per epoch: 2.5 epochs


@pytest.fixture(scope="module")
def map_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("map")
    check(torchrun(PROBE, probe_args(tmp, "r", *MAP)))
    return tmp


def test_max_steps_with_map_style_data_goes_on_over_reshuffled_epochs_and_ends_mid_epoch(map_reference):
    r0, r1 = reports(map_reference / "r")
    assert len(r0["seen"]) == len(r1["seen"]) == 15 * BATCH
    epochs = [sorted(r0["seen"][i:i + 24] + r1["seen"][i:i + 24]) for i in (0, 24)]
    assert epochs[0] == epochs[1] == list(range(48))  # two whole epochs, then 3 steps of the third
    assert r0["seen"][:24] != r0["seen"][24:48]  # reshuffled
    assert committed_steps(map_reference / "ckpt") == [12, 15]
    manifest = json.loads((map_reference / "ckpt" / "step_0000000015" / "manifest.json").read_text())
    assert (manifest["epoch"], manifest["iteration"]) == (2, 3)
    assert [s for s, _, _ in logged(map_reference / "out", "eval/count")] == [6, 12, 15]  # the last step too


def test_max_steps_with_map_style_data_resumed_mid_epoch_is_bitwise_identical(tmp_path, map_reference):
    saved, resumed, _ = interrupt_and_resume(tmp_path, *MAP, at=8)
    assert saved % 6, f"saved at step {saved}: an epoch boundary, not mid-epoch"
    assert [r["digest"] for r in resumed] == [r["digest"] for r in reports(map_reference / "r")]


# ---------------------------------------------------------------- in one process


def test_shard_iterable_gives_every_rank_and_worker_a_disjoint_deterministic_share():
    class Items(IterableDataset):
        def __init__(self, rank: int):
            self.rank = rank

        def __iter__(self):
            return iter(shard_iterable(range(50), rank=self.rank, world_size=2))

    got = {r: sorted(int(x) for b in DataLoader(Items(r), batch_size=None, num_workers=2) for x in [b])
           for r in range(2)}
    assert sorted(got[0] + got[1]) == list(range(50))
    assert got[0] == [i for i in range(50) if i % 4 in (0, 1)]  # readers 0 and 1 of 4: rank 0's two workers
    assert list(shard_iterable(range(10), rank=1, world_size=3)) == [1, 4, 7]


def test_max_epochs_defaults_to_ten_on_the_command_line_unless_max_steps_is_given():
    def kw(*argv: str) -> tuple:
        k = train_kwargs(parse_args(build_parser(), list(argv)))
        return k["max_epochs"], k["max_steps"]

    assert kw() == (10, None)
    assert kw("--max-steps", "100") == (None, 100)
    assert kw("--max-steps", "100", "--max-epochs", "2") == (2, 100)


class Counting(IterableDataset):
    """0 .. n-1, keeping its position."""

    def __init__(self, n: int):
        self.n, self.pos = n, 0

    def __iter__(self):
        while self.pos < self.n:
            self.pos += 1
            yield self.pos - 1
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def test_a_stream_goes_on_across_epochs_and_resumes_from_its_position_in_one_process():
    stream = Stream(DataLoader(Counting(10), batch_size=2), Runtime(), seed=1)
    assert [b.tolist() for b in stream.batches(2)] == [[0, 1], [2, 3]]  # an epoch cut short...
    assert [b.tolist() for b in stream.batches(1)] == [[4, 5]]  # ...continues
    resumed = Stream(DataLoader(Counting(10), batch_size=2), Runtime(), seed=1)
    resumed.load_state_dict(stream.state_dict())
    assert [b.tolist() for b in resumed.batches(None)] == [[6, 7], [8, 9]]
    assert [b.tolist() for b in resumed.batches(1)] == [[0, 1]]  # the next pass


def test_the_console_counts_optimizer_steps_against_max_steps():
    sink = ConsoleSink(terminal=False)
    sink.progress(Progress(step=5, epoch=1, iteration=5, epoch_length=None, max_epochs=None, optimizer_step=5,
                           max_steps=12))
    assert sink.line({"train/loss": 0.5}, 5, 1).startswith("epoch 1 step 5/12 | train/loss 0.5")
    sink.progress(Progress(step=8, epoch=1, iteration=8, epoch_length=None, max_epochs=None, optimizer_step=2,
                           max_steps=12))
    assert sink.line({}, 8, 1).startswith("epoch 1 step 8 (optimizer step 2/12)")


def test_tensor_positions_round_trip_exactly():
    from igniter_dist.streams import decode, encode

    seed = torch.tensor([3, 4])
    state = {"snapshot": {0: {}, "worker_1": (1, [2, {}])}, "seed": seed, "done": None}
    assert isinstance(encode(state), torch.Tensor)
    back = decode(encode(state))
    assert back["snapshot"] == state["snapshot"] and back["done"] is None and torch.equal(back["seed"], seed)


def test_a_stream_checkpoint_written_before_the_engine_refactor_resumes_bitwise(tmp_path, endless):
    """tests/fixtures/checkpoints/v0-stream: the stream probe's step 7 of 12 (2 ranks, each rank's position in
    its per-rank state), as main wrote it on 2026-12-08 (commit d18f214)."""
    shutil.copytree(ROOT / "tests" / "fixtures" / "checkpoints" / "v0-stream", tmp_path / "ckpt")
    second = check(torchrun(PROBE, probe_args(tmp_path, "second", *ENDLESS)))
    assert f"resumed from {tmp_path / 'ckpt'}/step_0000000007" in second.stderr
    reference = reports(endless / "r")
    for rank, report in enumerate(reports(tmp_path / "second")):
        assert report["digest"] == reference[rank]["digest"]
        assert report["seen"] == reference[rank]["seen"][7 * BATCH:]
