"""Choices made before any rank shards: sharding units, the hsdp layout, meta-device checks, options.

All in one process; what sharding does across ranks is tested in test_fsdp.py.
"""

from __future__ import annotations

import pytest
import torch
from fsdp_worker import Block, Net
from torch import nn

from igniter_dist.errors import ConfigError
from igniter_dist.parallel.fsdp import ShardingOptions, checkpoint_units, shard
from igniter_dist.parallel.materialize import on_meta
from igniter_dist.parallel.mesh import mesh_shape
from igniter_dist.parallel.units import parse_class_names, sharding_units
from igniter_dist.runtime import Runtime
from igniter_dist.wrapping import PrepareOptions


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)


class Tower(nn.Module):
    """No repeated blocks: one big and one small submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Sequential(nn.Linear(40, 50), nn.ReLU())
        self.small = nn.Linear(50, 2)


def test_default_units_are_the_repeated_blocks_outermost_first():
    model = Net()
    units = sharding_units(model)
    assert units == list(reversed(model.blocks))  # children before parents, root excluded
    assert all(isinstance(u, Block) for u in units)


def test_repeated_parameterless_children_are_not_units():
    model = Mlp()
    assert sharding_units(model) == [model.body[2], model.body[0]]


def test_without_repeated_blocks_units_are_the_submodules_above_the_size():
    model = Tower()
    assert sharding_units(model, min_params=1000) == [model.big[0]]  # 2050 parameters; `small` has 102
    assert sharding_units(model, min_params=100) == [model.small, model.big[0]]


def test_wrap_names_classes_and_an_unknown_name_is_refused_with_the_classes_there_are():
    model = Net()
    assert set(sharding_units(model, ["LayerNorm"])) == {b.norm for b in model.blocks}
    with pytest.raises(ConfigError) as e:
        sharding_units(model, ["Blokc"])
    assert str(e.value) == ("--fsdp-wrap names Blokc but the model has no submodule of that class; its classes "
                            "with parameters are Block, LayerNorm, Linear.")


def test_sharding_options_are_checked_where_they_enter():
    assert parse_class_names(" Block, Embedding ,") == ("Block", "Embedding")
    assert PrepareOptions(fsdp_wrap=["Block"]).fsdp_wrap == ("Block",)  # type: ignore[arg-type]  # a list, as a user passes
    with pytest.raises(ConfigError) as e:
        PrepareOptions(fsdp_wrap="my.Block,Net")  # type: ignore[arg-type]  # the wrong value is the test
    assert str(e.value) == "--fsdp-wrap takes class names separated by commas, got 'my.Block'."
    with pytest.raises(ConfigError, match="precision 'fp8' is not supported"):
        PrepareOptions(precision="fp8")  # type: ignore[arg-type]  # the wrong value is the test
    with pytest.raises(ConfigError, match="--strategy 'zero3' is not supported; use one of ddp, fsdp, hsdp."):
        PrepareOptions(strategy="zero3")  # type: ignore[arg-type]  # the wrong value is the test


def test_activation_checkpointing_wraps_the_outermost_units_and_keeps_state_dict_keys():
    model = Net()
    keys = list(model.state_dict())
    units = sharding_units(model, ["Block", "Linear"])
    wrapped = checkpoint_units(model, units)
    assert [type(b).__name__ for b in model.blocks] == ["CheckpointWrapper"] * 3
    assert type(model.inp).__name__ == type(model.head).__name__ == "CheckpointWrapper"
    inner = model.get_submodule("blocks.0._checkpoint_wrapped_module.fc")
    assert type(inner) is nn.Linear and inner in wrapped  # sharded on its own, checkpointed with its block
    assert sum(type(u).__name__ == "CheckpointWrapper" for u in wrapped) == 5
    assert list(model.state_dict()) == keys


def test_hsdp_layout_needs_equal_nodes_numbered_node_by_node():
    rt = Runtime(rank=3, world_size=4, local_rank=1, local_world_size=2, node_rank=1)
    assert mesh_shape(rt, "hsdp") == (2, 2)
    assert mesh_shape(rt, "fsdp") == (4,)
    uneven = Runtime(rank=2, world_size=5, local_rank=0, local_world_size=2, node_rank=1)
    assert mesh_shape(uneven, "hsdp") == (
        "--strategy hsdp needs the same number of ranks on every node, numbered node by node, but rank 2 is local "
        "rank 0 of 2 on node 1 in a world of 5; start every node with the same --nproc-per-node, or use "
        "--strategy fsdp.")


def test_a_model_partly_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = Net()
    model.head = nn.Linear(10, 3)
    with pytest.raises(ConfigError, match="14 of the model's 16 parameters and buffers are on the meta device and "
                                          "the others are not"):
        on_meta(model)


def test_a_meta_model_without_reset_parameters_needs_init():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 3), Scale())
    with pytest.raises(ConfigError) as e:
        shard(model, Runtime(), "fsdp", ShardingOptions())
    assert str(e.value) == ("The model was built on the meta device but Scale has parameters or buffers and no "
                            "reset_parameters(); pass ig.prepare(model, init=fn) with fn(module) initialising a "
                            "module's own tensors.")

    def halves(module: nn.Module) -> None:
        for p in module.parameters(recurse=False):
            p.fill_(0.5)

    materialised = shard(model, Runtime(), "fsdp", ShardingOptions(init=halves))
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in materialised.parameters())


def test_one_process_is_left_unsharded_on_the_device():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = shard(model, Runtime(), "hsdp", ShardingOptions(activation_checkpointing=True, cpu_offload=True))
    assert out is model and not any(type(p).__name__ == "DTensor" for p in model.parameters())
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_compile_under_fsdp_compiles_each_unit_in_place_and_keeps_the_keys():
    model = Net()
    keys = list(model.state_dict())
    shard(model, Runtime(), "fsdp", ShardingOptions(compile=True))
    assert [b._compiled_call_impl is not None for b in model.blocks] == [True] * 3  # nn.Module.compile() in place
    assert model._compiled_call_impl is None and list(model.state_dict()) == keys
