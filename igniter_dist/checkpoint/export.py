"""Consolidated model files for inference: `model.pt` (weights_only-loadable) or `.safetensors`."""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointError, IgniterError
from ..parallel import is_sharded
from ..wrapping import unwrap
from . import layout
from .safe_load import SafeLoadPlanner, load_metadata, safe_reader
from .state import PER_RANK_PREFIX, buffers_for, quiet_single_process
from .storage import Storage, root_cause


def export_model(model: nn.Module, path_or_url: str) -> None:
    """Write the unwrapped model's full state dict (no DDP `module.` prefix) to a file or URL.

    Call it on rank 0 only, or, for a sharded model, on every rank (the gather is a collective;
    rank 0 writes). A `.safetensors` name writes safetensors; anything else `torch.save`.
    """
    state = model_state(model)
    if state or not is_sharded(model):
        write_state(state, path_or_url)


def model_state(model: nn.Module) -> dict[str, Any]:
    """The unwrapped model's full state dict, copied to the CPU.

    Collective for a sharded model: the tensors are gathered to rank 0 one by one (other ranks get
    an empty dict), so no rank holds more than the CPU copy and one tensor on the device."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
            for k, v in unwrap(model).state_dict().items()}


def write_state(state: dict[str, Any], path_or_url: str) -> None:
    """Serialise a flat state dict to `path_or_url`, atomically where the storage allows."""
    if path_or_url.endswith(".safetensors"):
        data = _safetensors_bytes(state, path_or_url)
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    parent, _, name = path_or_url.rstrip("/").rpartition("/")
    storage = Storage(parent or ".")
    try:
        storage.makedirs()
        storage.write_atomic(data, name)
    except IgniterError:
        raise
    except Exception as e:
        raise storage.error("write", e, path_or_url) from None


def read_state(path_or_url: str) -> dict[str, Any]:
    """One process: the flat state dict in a `model.pt` (read with `weights_only`) or `.safetensors` file."""
    parent, _, name = path_or_url.rstrip("/").rpartition("/")
    storage = Storage(parent or ".")
    try:
        data = storage.read_bytes(name)
    except FileNotFoundError:
        raise CheckpointError(f"{path_or_url} does not exist.") from None
    except Exception as e:
        raise storage.error("read", e, path_or_url) from None
    try:
        if name.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state: Any = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except ImportError:
        raise CheckpointError(f"Cannot read {path_or_url}: safetensors is not installed; "
                              "pip install safetensors.") from None
    except Exception as e:
        raise CheckpointError(f"{path_or_url} is not a model file igniter-dist can read ({_first_line(e)}).") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path_or_url} holds a {type(state).__name__}, not a model's state dict.")
    return state


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _safetensors_bytes(state: dict[str, Any], url: str) -> bytes:
    try:
        from safetensors.torch import save as save_safetensors
    except ImportError:
        raise CheckpointError(f"Cannot write {url}: safetensors is not installed; pip install safetensors.") from None
    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return save_safetensors(tensors)


def consolidate(step_url: str, key: str = "model") -> dict[str, Any]:
    """One process: the full state dict saved under `key` in the checkpoint folder `step_url`."""
    storage = Storage(step_url)
    if not storage.exists(layout.MANIFEST):
        raise CheckpointError(f"{step_url} is not a committed checkpoint (it has no {layout.MANIFEST}).")
    try:
        metadata = load_metadata(io.BytesIO(storage.read_bytes(layout.DCP_METADATA)), step_url)
    except IgniterError:
        raise
    except Exception as e:
        raise storage.error("read the metadata of", e) from None
    prefix = key + "."
    keys = sorted(k for k in metadata.state_dict_metadata if k.startswith(prefix))
    if not keys:
        names = sorted({k.split(".", 1)[0] for k in metadata.state_dict_metadata
                        if not k.startswith(PER_RANK_PREFIX)})
        raise CheckpointError(f"The checkpoint {step_url} holds no state named {key!r}; choose one of {names}.")
    template = buffers_for(metadata.state_dict_metadata, keys)
    try:
        with quiet_single_process(False):
            dcp.load(template, storage_reader=safe_reader(step_url), planner=SafeLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as e:
        cause = root_cause(e)
        if isinstance(cause, IgniterError):
            raise CheckpointError(str(cause)) from None
        raise storage.error("load", cause) from None
    return {k[len(prefix):]: v for k, v in template.items()}
