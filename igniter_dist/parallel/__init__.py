"""Model wrapping by strategy: the device mesh, the sharding units and FSDP2's `fully_shard`.

Modules here are imported when a strategy needs them, so `import igniter_dist` does not pay for
torch.distributed.fsdp.
"""
