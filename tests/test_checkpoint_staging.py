"""Async-save staging: each rank copies only the replicated tensors it writes, into reused buffers.

The two-rank async saves that load back bitwise are in test_checkpoint.py; these pin the parts that
only show as speed: what is skipped, that the split is the same on every rank, that buffers are reused.
"""

from __future__ import annotations

import torch
from torch import nn

from igniter_dist.checkpoint import staging
from igniter_dist.checkpoint.state import classify, per_rank_key, to_save


def adam_state() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optim = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optim.step()
    return to_save(classify({"model": model, "optim": optim, "extra": {"ema": [torch.ones(3)], "n": 3}}),
                   {"sampler": {"position": 5}}, rank=0)


def test_owners_split_every_shared_tensor_once_and_balance_bytes():
    sd = adam_state()
    shared = staging.shared_tensors(sd)
    assert ("model", "0.weight") in shared and ("optim", "state", "0.weight", "exp_avg") in shared
    assert not any(p[0].startswith("per_rank/") for p in shared)
    assert not any(p[:2] == ("extra", "ema") for p in shared)  # a tensor in a list: every rank stages it
    owner = staging.owners(shared, 3)
    assert set(owner) == set(shared) and set(owner.values()) == {0, 1, 2}
    load = [0, 0, 0]
    for path, rank in owner.items():
        load[rank] += shared[path].numel() * shared[path].element_size()
    biggest = max(t.numel() * t.element_size() for t in shared.values())
    assert max(load) - min(load) <= biggest
    # Another process building the same state decides the same owners.
    assert staging.owners(staging.shared_tensors(adam_state()), 3) == owner


def test_fingerprint_tells_different_shapes_apart():
    sd = adam_state()
    fp = staging.fingerprint(staging.shared_tensors(sd))
    assert fp == staging.fingerprint(staging.shared_tensors(adam_state()))
    sd["model"]["0.bias"] = torch.zeros(17)
    assert staging.fingerprint(staging.shared_tensors(sd)) != fp


def test_stage_skips_others_share_keeps_the_rest_and_copies():
    sd = adam_state()
    shared = staging.shared_tensors(sd)
    owner = staging.owners(shared, 2)
    skip = {p for p, r in owner.items() if r != 0}
    staged = staging.Stager().stage(sd, skip)
    kept = staging.shared_tensors(staged)
    assert set(kept) == {p for p, r in owner.items() if r == 0}
    for path, t in kept.items():
        assert torch.equal(t, shared[path]) and t.data_ptr() != shared[path].data_ptr()
    assert staged[per_rank_key(0)] == sd[per_rank_key(0)]
    assert staged["extra"]["n"] == 3 and torch.equal(staged["extra"]["ema"][0], torch.ones(3))
    assert staged["optim"]["param_groups"] == sd["optim"]["param_groups"]
    # The copy does not follow the live tensors as training changes them.
    with torch.no_grad():
        for t in shared.values():
            t.add_(1)
    for path, t in kept.items():
        assert not torch.equal(t, shared[path])


def test_stage_reuses_buffers_between_saves_and_drops_stale_ones():
    sd = adam_state()
    stager = staging.Stager()
    first = stager.stage(sd)
    w = first["model"]["0.weight"]
    with torch.no_grad():
        sd["model"]["0.weight"].mul_(2)
    second = stager.stage(sd)
    assert second["model"]["0.weight"].data_ptr() == w.data_ptr()  # the same memory, new values
    assert torch.equal(second["model"]["0.weight"], sd["model"]["0.weight"])
    sd["model"]["0.weight"] = torch.zeros(3, 3)  # a new shape gets a new buffer
    third = stager.stage(sd, {("model", "2.weight")})
    assert third["model"]["0.weight"].shape == (3, 3) and "2.weight" not in third["model"]
    assert ("model", "2.weight") not in stager._buffers
