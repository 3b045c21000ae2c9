"""FSDP2 and HSDP for real: 2-rank gloo jobs train the same model under fsdp and DDP side by side, DCP
checkpoints move between strategies and world sizes (2, 1, 3), hsdp runs on two torchrun agents of two
processes each. The jobs run once per module (see tests/workers/fsdp_worker.py); the tests read what
they wrote.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import fsdp_worker as worker
import pytest
import torch

import launch
from igniter_dist.checkpoint import CheckpointManager
from igniter_dist.cli import main as cli_main
from igniter_dist.runtime import Runtime

WORKER = Path(__file__).parent / "workers" / "fsdp_worker.py"


def outputs(folder: Path, mode: str, world: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    ranks = [json.loads((folder / f"{mode}_rank{r}.json").read_text()) for r in range(world)]
    return ranks, torch.load(folder / f"{mode}_rank0.pt", weights_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    launch.check(launch.torchrun(WORKER, ["train", "--dir", str(folder)], nproc=2, timeout=400))
    return folder, *outputs(folder, "train", 2)


@pytest.fixture(scope="module")
def loaded_on_3(trained):
    folder = trained[0]
    launch.check(launch.torchrun(WORKER, ["load", "--dir", str(folder)], nproc=3, timeout=400))
    return outputs(folder, "load", 3)[1]


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory):
    """Two torchrun agents on 127.0.0.1, two processes each: node 0 and node 1 of one job."""
    folder = tmp_path_factory.mktemp("hsdp")
    port = launch.free_port()
    agents = [subprocess.Popen(launch.torchrun_cmd(WORKER, ["hsdp", "--dir", str(folder)], nproc=2, nnodes=2,
                                                   node_rank=node, port=port),
                               env=launch.child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for node in (0, 1)]
    try:
        logs = [a.communicate(timeout=400)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    for node, (a, log) in enumerate(zip(agents, logs, strict=True)):
        assert a.returncode == 0, f"node {node} exited {a.returncode}:\n{log[-6000:]}"
    return folder, *outputs(folder, "hsdp", 4)


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Bitwise equality of nested state: same keys, same tensors, same values."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and torch.equal(got, want), where
    else:
        assert got == want, where


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_each_rank_holds_about_half_of_the_parameters_and_adam_state(trained):
    _, ranks, _ = trained
    total = ranks[0]["fsdp"]["params_total"]
    assert sum(r["fsdp"]["params_local"] for r in ranks) == total
    for r in ranks:
        assert 0.45 * total <= r["fsdp"]["params_local"] <= 0.55 * total
        assert r["fsdp"]["adam_local"] == 2 * r["fsdp"]["params_local"]  # exp_avg and exp_avg_sq, sharded alike
        assert r["ddp"]["params_local"] == total and r["ddp"]["adam_local"] == 2 * total


def test_fsdp_trains_like_ddp(trained):
    _, ranks, tensors = trained
    for r in ranks:
        assert r["fsdp"]["loss"] == pytest.approx(r["ddp"]["loss"], rel=1e-5)
    assert max_difference(tensors["fsdp"]["model"], tensors["ddp"]["model"]) < 1e-6
    fsdp_state, ddp_state = tensors["fsdp"]["optim"]["state"], tensors["ddp"]["optim"]["state"]
    assert max(max_difference(fsdp_state[k], ddp_state[k]) for k in ddp_state) < 1e-6


def test_clipping_uses_the_global_norm_over_all_shards(trained):
    _, ranks, _ = trained
    for r in ranks:
        assert r["fsdp"]["norm"] == pytest.approx(r["ddp"]["norm"], rel=1e-6)
        assert min(r["fsdp"]["norm"]) > worker.CLIP  # every step was clipped


def test_accumulation_reduces_only_at_the_last_micro_batch_and_equals_the_bigger_batch(trained):
    _, ranks, tensors = trained
    for r in ranks:
        acc = r["accumulation"]
        assert acc["reduce_scatters_before_last"] == 0 and acc["grads_before_last"] == 0
        assert acc["reduce_scatters_at_last"] > 0
    grads = tensors["accumulation"]
    assert max_difference(grads["micro"], grads["whole"]) < 1e-6


@pytest.mark.parametrize("target", ["fsdp", "ddp"])
@pytest.mark.parametrize("source", ["fsdp", "ddp"])
def test_checkpoints_load_bitwise_across_strategies_and_world_sizes(trained, loaded_on_3, source, target):
    folder, _, tensors = trained
    saved = tensors[source]
    if f"{target}_from_{source}" in tensors:  # 2 ranks; the same strategy on 2 ranks was loaded too
        assert_same(tensors[f"{target}_from_{source}"], saved, f"2 ranks {target} from {source}")
    assert_same(loaded_on_3[f"{target}_from_{source}"], saved, f"3 ranks {target} from {source}")
    one_process = worker.loaded(Runtime(), target, folder / f"{source}_ckpt")  # no process group: unwrapped
    assert_same(one_process, saved, f"1 process {target} from {source}")


def test_two_rank_fsdp_checkpoint_reloads_under_fsdp(trained):
    _, _, tensors = trained
    assert_same(tensors["fsdp_from_fsdp"], tensors["fsdp"])


def test_checkpoint_manager_saves_shards_synchronously_and_in_the_background(trained, tmp_path):
    """Async staging copies each rank's own shard (DTensors are not replicas), so both saves hold the whole
    model; they load back on 2 ranks and on one process, and the CLI exports one without launching ranks."""
    folder, _, tensors = trained
    saved = tensors["manager"]["saved"]
    for mode in ("sync", "async"):
        assert_same(tensors["manager"][mode], saved, mode)
        model = worker.Net()
        optimizer = torch.optim.Adam(model.parameters(), lr=worker.LR)
        CheckpointManager(str(folder / "manager" / mode), Runtime()).load(2, {"model": model, "optimizer": optimizer})
        assert_same(model.state_dict(), saved["model"], f"{mode} on one process")
    out = tmp_path / "model.pt"
    assert cli_main(["checkpoints", "export", str(folder / "manager" / "async"), "--to", str(out)]) == 0
    assert_same(torch.load(out, weights_only=True), saved["model"])


@pytest.mark.parametrize("world", [2, 3])
def test_uneven_evaluation_shards_run_in_lockstep_and_count_every_sample_once(trained, loaded_on_3, world):
    ranks = trained[1] if world == 2 else outputs(trained[0], "load", 3)[0]
    for case, size in (("uneven", 5), ("unsized", 5), ("empty_rank", 1)):
        runs = [r["evaluation"][case] for r in ranks]
        assert len({r["shard"] for r in runs}) > 1, case  # the shards really differ
        assert {r["forwards"] for r in runs} == {max(r["shard"] for r in runs)}, case
        assert sorted(i for r in runs for i in r["counted"]) == list(range(size)), case
    assert all(r["evaluation"]["sharded_after"] for r in ranks)


def test_meta_device_model_materialises_sharded_as_the_eager_model(trained, loaded_on_3):
    in_process = worker.meta_init(Runtime())
    for where, meta in (("2 ranks", trained[2]["meta"]), ("3 ranks", loaded_on_3["meta"]), ("1 process", in_process)):
        for init in ("reset", "init"):
            assert_same(meta[f"{init}_meta"], meta[f"{init}_eager"], f"{where} {init}")
    assert meta["init_meta"]["head.bias"].abs().sum() == 0  # the user's init ran, not reset_parameters


def test_mixed_precision_computes_in_16_bits_and_keeps_fp32_weights(trained):
    _, _, tensors = trained
    fp32 = tensors["fsdp"]["model"]
    for precision, dtype, tolerance in (("bf16-mixed", "torch.bfloat16", 0.05), ("16-mixed", "torch.float16", 2e-3)):
        run = tensors["precision"][precision]
        assert run["compute_dtype"] == dtype
        assert run["output_dtype"] == "torch.float32" and run["param_dtypes"] == ["torch.float32"]
        assert max_difference(run["state"], fp32) < tolerance
    assert tensors["precision"]["16-mixed"]["scale"] == 65536.0  # the sharded scaler found no overflow


def test_16_mixed_skips_the_step_on_every_rank_when_one_shard_overflows(trained):
    """The engine's GradScaler under fsdp: an inf in rank 1's gradient shard alone makes both ranks skip the
    optimizer step and halve the scale (found_inf is agreed over the mesh), so the shards never diverge."""
    _, ranks, _ = trained
    for r in ranks:
        assert r["overflow"]["shards"] > 0
        assert r["overflow"]["changed"] == 0
        assert r["overflow"]["scale"] == 32768.0


def test_activation_checkpointing_and_cpu_offload_train_the_same(trained):
    _, ranks, tensors = trained
    assert all("._checkpoint_wrapped_module." in n for n in ranks[0]["ac_offload"]["param_names"] if "blocks" in n)
    assert ranks[0]["ac_offload"]["loss"] == pytest.approx(ranks[0]["fsdp"]["loss"], rel=1e-6)
    assert max_difference(tensors["ac_offload"]["model"], tensors["fsdp"]["model"]) < 1e-6


def test_full_state_dict_export_loads_into_the_plain_module(trained):
    folder, _, tensors = trained
    state = torch.load(folder / "model.pt", weights_only=True)
    model = worker.Net()
    model.load_state_dict(state, strict=True)  # no wrapper prefixes, every key present
    assert_same(model.state_dict(), tensors["ac_offload"]["model"])


def test_hsdp_shards_within_a_node_and_replicates_across_nodes(hsdp):
    folder, ranks, tensors = hsdp
    total = ranks[0]["hsdp"]["params_total"]
    for r in ranks:
        assert r["placements"] == ["(Replicate(), Shard(dim=0))"]
        assert 0.45 * total <= r["hsdp"]["params_local"] <= 0.55 * total  # half: two ranks per node
        assert r["hsdp"]["norm"] == pytest.approx(r["ddp"]["norm"], rel=1e-6)
        assert r["hsdp"]["loss"] == pytest.approx(r["ddp"]["loss"], rel=1e-5)
    for local_rank in (0, 1):  # the same shard on both nodes
        node0 = torch.load(folder / f"hsdp_shard_rank{local_rank}.pt", weights_only=True)
        node1 = torch.load(folder / f"hsdp_shard_rank{local_rank + 2}.pt", weights_only=True)
        assert_same(node1, node0)
    assert max_difference(tensors["hsdp"]["model"], tensors["ddp"]["model"]) < 1e-6
