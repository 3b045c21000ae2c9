"""Turning the objects to save into a DCP state dict, and a loaded one back into those objects.

Models and optimizers go through `torch.distributed.checkpoint.state_dict`, so keys carry no DDP
`module.` prefix and optimizer state is keyed by parameter name. Anything else with
`state_dict`/`load_state_dict`, and plain dicts, are stored as nested values. Per-rank state lives
under `per_rank/<rank>`, a key only that rank writes.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from ..errors import CheckpointError, ConfigError

PER_RANK_PREFIX = "per_rank/"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_SHOWN_KEYS = 5

Kind = Literal["model", "optimizer", "stateful", "dict"]


@dataclass(frozen=True)
class Entry:
    """One named object to save: what kind it is and, for an optimizer, the model it trains."""

    name: str
    kind: Kind
    obj: Any
    model: nn.Module | None = None


def per_rank_key(rank: int) -> str:
    return f"{PER_RANK_PREFIX}{rank}"


def classify(state: dict[str, Any]) -> list[Entry]:
    """Name and sort the objects to save; ConfigError for a name or object that cannot be saved."""
    entries: list[Entry] = []
    models = [(n, o) for n, o in state.items() if isinstance(o, nn.Module)]
    for name, obj in state.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"Checkpointed state names may use letters, digits, '_' and '-' only, got {name!r}."
            )
        if isinstance(obj, nn.Module):
            entries.append(Entry(name, "model", obj))
        elif isinstance(obj, torch.optim.Optimizer):
            entries.append(Entry(name, "optimizer", obj, _owner(name, obj, models)))
        elif callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
            entries.append(Entry(name, "stateful", obj))
        elif isinstance(obj, dict):
            entries.append(Entry(name, "dict", obj))
        else:
            raise ConfigError(
                f"Cannot checkpoint {name!r} of type {type(obj).__name__}: give a module, an optimizer, "
                "an object with state_dict()/load_state_dict(), or a dict."
            )
    return entries


def _owner(name: str, optim: torch.optim.Optimizer, models: list[tuple[str, nn.Module]]) -> nn.Module:
    params = {id(p) for group in optim.param_groups for p in group["params"]}
    for _, model in models:
        if params <= {id(p) for p in model.parameters()}:
            return model
    raise ConfigError(
        f"The optimizer {name!r} trains parameters of no single nn.Module in the checkpointed state; "
        "add the model it optimizes to to_save."
    )


def _sole_optimizer(entries: list[Entry], model: Entry) -> Entry | None:
    """The one optimizer entry that trains `model`, if exactly one does."""
    optims = [e for e in entries if e.kind == "optimizer" and e.model is model.obj]
    return optims[0] if len(optims) == 1 else None


def live_state_dicts(entries: list[Entry]) -> dict[str, dict[str, Any]]:
    """The state dicts of the models and optimizers among `entries`, by entry name.

    A model with its one optimizer goes through one `get_state_dict` call, which walks the model
    once for both (3-4 ms less for the 212 tensors of benchmarks/sharding's fsdp shard)."""
    out: dict[str, dict[str, Any]] = {}
    for e in entries:
        if e.kind == "model":
            optim = _sole_optimizer(entries, e)
            if optim is None:
                out[e.name] = get_model_state_dict(e.obj)
            else:
                out[e.name], out[optim.name] = get_state_dict(e.obj, optim.obj)
    for e in entries:
        if e.kind == "optimizer" and e.name not in out:
            assert e.model is not None
            out[e.name] = get_optimizer_state_dict(e.model, e.obj)
    return out


def to_save(entries: list[Entry], per_rank: dict[str, Any], rank: int) -> dict[str, Any]:
    """The DCP state dict for one save on this rank."""
    lives = live_state_dicts(entries)
    sd: dict[str, Any] = {}
    for e in entries:
        if e.name in lives:
            sd[e.name] = lives[e.name]
        elif e.kind == "stateful":
            sd[e.name] = e.obj.state_dict()
        else:
            sd[e.name] = e.obj
    # `rank` marks the entry as present even when the per-rank state is empty.
    sd[per_rank_key(rank)] = {"rank": rank, "state": per_rank}
    return sd


_WEIGHTS_ONLY_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.Size,
                        torch.device, torch.layout)


def unloadable(sd: dict[str, Any]) -> str | None:
    """A sentence naming the first value that `torch.load(weights_only=True)` would refuse, or None."""

    def walk(value: Any, where: str) -> str | None:
        if isinstance(value, torch.Tensor) or type(value) in _WEIGHTS_ONLY_LEAVES:
            return None
        if type(value) in (dict, OrderedDict):
            for k, v in value.items():
                found = walk(v, f"{where}[{k!r}]")
                if found:
                    return found
            return None
        if type(value) in (list, tuple, set):
            for i, v in enumerate(value):
                found = walk(v, f"{where}[{i}]")
                if found:
                    return found
            return None
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        return (f"Cannot checkpoint {where}: a {kind} would not load back under weights_only; store it as a "
                "tensor or as plain numbers, strings, lists, tuples and dicts.")

    for name, value in sd.items():
        if name.startswith(PER_RANK_PREFIX):
            name, value = "per_rank", value.get("state", {})
        found = walk(value, name)
        if found:
            return found
    return None


def saved_world_size(metadata: Metadata) -> int:
    """How many ranks wrote the checkpoint, from the per-rank entries."""
    ranks = {r for k in metadata.state_dict_metadata if (r := _rank_of(k)) is not None}
    return max(ranks) + 1 if ranks else 1


def _rank_of(fqn: str) -> int | None:
    if not fqn.startswith(PER_RANK_PREFIX):
        return None
    head = fqn[len(PER_RANK_PREFIX):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def load_template(entries: list[Entry], metadata: Metadata, rank: int, url: str, *,
                  rank_state: bool = True) -> dict[str, Any]:
    """The state dict to hand to `dcp.load`: live tensors for models and optimizers (loaded in place),
    fresh buffers shaped from the checkpoint for everything else, and this rank's own state unless
    `rank_state` is False. Only the entries' keys are asked for: DCP reads nothing else.

    Raises CheckpointError, identically on every rank, when a model or optimizer does not match.
    """
    saved = metadata.state_dict_metadata
    template: dict[str, Any] = {}
    lives = live_state_dicts(entries)
    for e in entries:
        if e.kind in ("model", "optimizer"):
            live = lives[e.name]
            if not _saved_under(saved, e.name):
                raise CheckpointError(f"The checkpoint {url} holds no state named {e.name!r}.")
            prefix = len(e.name) + 1
            problem = mismatch(e.kind, e.name, shapes(live), {k[prefix:]: _saved_shape(saved[k])
                                                                 for k in _saved_under(saved, e.name)}, "checkpoint")
            if problem:
                raise CheckpointError(f"The checkpoint {url} does not match {problem}.")
            template[e.name] = live
        else:
            keys = _saved_under(saved, e.name)
            if not keys:
                raise CheckpointError(f"The checkpoint {url} holds no state named {e.name!r}; it has "
                                      f"{_show(sorted(_top_names(saved)))}.")
            template.update(buffers_for(saved, keys))
    if rank_state:
        template.update(buffers_for(saved, _saved_under(saved, per_rank_key(rank))))
    return template


def apply(entries: list[Entry], loaded: dict[str, Any], metadata: Metadata, rank: int) -> dict[str, Any] | None:
    """Put loaded values into the objects; returns this rank's per-rank state (None if it had none)."""
    nested = unflatten({k: v for k, v in loaded.items() if "." in k or k.startswith(PER_RANK_PREFIX)},
                       metadata)
    paired: set[str] = set()
    for e in entries:
        if e.kind == "model" and (optim := _sole_optimizer(entries, e)) is not None:
            # One walk of the model for both, as in `live_state_dicts`.
            set_state_dict(e.obj, optim.obj, model_state_dict=loaded[e.name], optim_state_dict=loaded[optim.name])
            paired.update((e.name, optim.name))
    for e in entries:
        if e.name in paired:
            continue
        if e.kind == "model":
            set_model_state_dict(e.obj, loaded[e.name])
        elif e.kind == "optimizer":
            assert e.model is not None
            set_optimizer_state_dict(e.model, e.obj, loaded[e.name])
        elif e.kind == "stateful":
            e.obj.load_state_dict(_merge(e.obj.state_dict(), nested.get(e.name, {})))
        else:
            _update_in_place(e.obj, nested.get(e.name, {}))
    mine = nested.get(per_rank_key(rank))
    if not isinstance(mine, dict) or "rank" not in mine:
        return None
    state = mine.get("state", {})
    return state if isinstance(state, dict) else {}


def unflatten(flat: dict[str, Any], metadata: Metadata) -> dict[str, Any]:
    """Rebuild nested dicts and lists from DCP's flat keys, using the paths DCP recorded at save."""
    paths = metadata.planner_data or {}
    root: dict[Any, Any] = {}
    for fqn, value in flat.items():
        path = paths.get(fqn)
        if not isinstance(path, tuple) or not path or not all(isinstance(p, (str, int)) for p in path):
            raise CheckpointError(
                f"The checkpoint records no valid key path for {fqn!r}; it was not written by igniter-dist."
            )
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    """Dicts whose keys are all ints (DCP's list indices) back into lists."""
    if not isinstance(node, dict):
        return node
    node = {k: _lists(v) for k, v in node.items()}
    if node and all(isinstance(k, int) for k in node):
        return [node[i] for i in sorted(node)]
    return node


def _merge(current: Any, loaded: Any) -> Any:
    """`loaded` over `current`, so containers DCP could not store (empty ones) keep their live value."""
    if isinstance(current, dict) and isinstance(loaded, dict):
        out = dict(current)
        for k, v in loaded.items():
            out[k] = _merge(current.get(k), v) if k in current else v
        return out
    return loaded


def _update_in_place(target: dict[str, Any], loaded: dict[str, Any]) -> None:
    for k, v in loaded.items():
        cur = target.get(k)
        if isinstance(cur, torch.Tensor) and isinstance(v, torch.Tensor) and cur.shape == v.shape:
            with torch.no_grad():
                cur.copy_(v)
        elif isinstance(cur, dict) and isinstance(v, dict):
            _update_in_place(cur, v)
        else:
            target[k] = v


def buffers_for(saved: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in keys:
        md = saved[k]
        if isinstance(md, TensorStorageMetadata):
            out[k] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
        else:
            out[k] = None  # a non-tensor value: replaced by the loaded one
    return out


def _saved_under(saved: dict[str, Any], name: str) -> list[str]:
    return sorted(k for k in saved if k.startswith(name + "."))


def _top_names(saved: dict[str, Any]) -> set[str]:
    return {k.split(".", 1)[0] for k in saved if not k.startswith(PER_RANK_PREFIX)}


Shapes = dict[str, tuple[int, ...] | None]  # flat key -> a tensor's global shape, None for other values


def mismatch(kind: str, name: str, live: Shapes, saved: Shapes, source: str) -> str | None:
    """Pure: "the model 'model': <what differs>" when the keys or tensor shapes of `saved` (read from
    `source`, such as "checkpoint") are not those of the live object; None when they match."""
    missing = sorted(live.keys() - saved.keys())
    unexpected = sorted(saved.keys() - live.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the {source}: {_show(missing)}")
        if unexpected:
            parts.append(f"in the {source} but not in the {kind}: {_show(unexpected)}")
        return f"the {kind} {name!r}: {'; '.join(parts)}"
    for key in sorted(live):
        if live[key] is not None and saved[key] is not None and live[key] != saved[key]:
            return (f"the {kind} {name!r}: {key!r} has shape {list(saved[key] or ())} in the {source} and "
                    f"{list(live[key] or ())} in the {kind}")
    return None


def shapes(value: Any) -> Shapes:
    """The flat keys of a (nested) state dict, as DCP names them below the entry's name, with tensor shapes."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(value)
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in flat.items()}


def _saved_shape(md: Any) -> tuple[int, ...] | None:
    return tuple(md.size) if isinstance(md, TensorStorageMetadata) else None


def _show(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOWN_KEYS])
    return shown + (f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else "")


@contextlib.contextmanager
def quiet_single_process(distributed: bool) -> Iterator[None]:
    """Silence DCP's "assuming a single process" warning where one process is what we mean."""
    if distributed:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
