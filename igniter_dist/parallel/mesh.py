"""The data-parallel device mesh of a strategy: 1-D over all ranks (fsdp), nodes x local ranks (hsdp)."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..errors import ConfigError
from ..runtime import Runtime
from . import Strategy


def mesh_shape(rt: Runtime, strategy: Strategy) -> tuple[int, ...] | str:
    """The mesh shape for `strategy` on this rank, or a sentence saying why this job cannot have one.

    hsdp needs ranks laid out node by node (torchrun's order) with the same number on every node,
    so row r of the mesh is node r and parameters are sharded within a node, replicated across nodes.
    """
    if strategy != "hsdp":
        return (rt.world_size,)
    nodes, local = rt.num_nodes, rt.local_world_size
    if nodes * local != rt.world_size or rt.rank != rt.node_rank * local + rt.local_rank:
        return (f"--strategy hsdp needs the same number of ranks on every node, numbered node by node, but rank "
                f"{rt.rank} is local rank {rt.local_rank} of {local} on node {rt.node_rank} in a world of "
                f"{rt.world_size}; start every node with the same --nproc-per-node, or use --strategy fsdp.")
    return (nodes, local)


def data_mesh(rt: Runtime, strategy: Strategy) -> DeviceMesh:
    """Collective: the device mesh that `fully_shard` shards over (dims "shard", or "replicate" x "shard").

    Every rank checks its layout and the ranks agree before any builds the mesh, so a bad layout on
    one node raises the same ConfigError everywhere instead of leaving the others waiting.
    """
    shape = mesh_shape(rt, strategy)
    problems = [p for p in rt.all_gather_object(shape if isinstance(shape, str) else None) if p]
    if problems:
        raise ConfigError(problems[0])
    assert not isinstance(shape, str)
    names = ("replicate", "shard") if strategy == "hsdp" else ("shard",)
    return init_device_mesh(rt.device.type, shape, mesh_dim_names=names)
