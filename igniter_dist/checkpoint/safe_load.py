"""Reading checkpoints without running their code.

DCP reads `.metadata` with plain `pickle.load` and non-tensor values with
`torch.load(weights_only=False)`: either runs whatever a crafted file asks. Here `.metadata` goes
through an unpickler that resolves only DCP's own metadata types, and every value goes through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import IO, Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from ..errors import CheckpointError, DamagedCheckpoint
from . import direct_read, load_plan
from .storage import fsspec_io, is_outage

_DCP = "torch.distributed.checkpoint"
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    (f"{_DCP}.metadata", "Metadata"),
    (f"{_DCP}.metadata", "BytesStorageMetadata"),
    (f"{_DCP}.metadata", "ChunkStorageMetadata"),
    (f"{_DCP}.metadata", "MetadataIndex"),
    (f"{_DCP}.metadata", "StorageMeta"),
    (f"{_DCP}.metadata", "TensorProperties"),
    (f"{_DCP}.metadata", "TensorStorageMetadata"),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
})
_SAFE_FILE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves DCP metadata classes and torch dtypes; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not a DCP metadata type")


def load_metadata(stream: IO[bytes], url: str) -> Metadata:
    """Unpickle a DCP `.metadata` stream with the restricted unpickler; DamagedCheckpoint if it is not one."""
    try:
        metadata = _MetadataUnpickler(stream).load()
    except Exception as e:
        raise DamagedCheckpoint(
            f"Refusing to load {url}: its .metadata is not plain DCP metadata ({e}); the checkpoint is "
            "damaged or was crafted to run code."
        ) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise DamagedCheckpoint(f"Refusing to load {url}: its .metadata does not hold DCP metadata.")
    for info in (metadata.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not _SAFE_FILE.match(rel) or rel in (".", ".."):
            raise DamagedCheckpoint(
                f"Refusing to load {url}: its .metadata points at a file outside the checkpoint ({rel!r})."
            )
    return metadata


def _first_sentence(exc: BaseException) -> str:
    """The start of an exception's message (torch's zip and pickle errors run to a paragraph)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return text.split(". ", 1)[0].rstrip(".")


def load_value(data: IO[bytes], fqn: str) -> Any:
    """A saved non-tensor value, read with `weights_only` semantics; DamagedCheckpoint if refused."""
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DamagedCheckpoint(f"the value {fqn!r} does not load with weights_only "
                                f"({_first_sentence(e) or type(e).__name__})") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner with non-tensor values read through `weights_only`, and its local
    plan made faster where each live tensor is exactly one stored chunk (`load_plan`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._destinations: dict[MetadataIndex, torch.Tensor] = {}

    def create_local_plan(self) -> LoadPlan:
        # No version: written by a torch whose keys may differ (before 2.4), which DCP translates.
        if self.metadata is None or self.metadata.version is None:
            return super().create_local_plan()
        plan, self._destinations = load_plan.local_load_plan(self.state_dict, self.metadata,
                                                             not self.allow_partial_load)
        return plan

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        found = self._destinations.get(read_item.dest_index)
        return super().resolve_tensor(read_item) if found is None else found

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        loaded = load_value(value, fqn)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def safe_reader(url: str, direct: bool = True, metadata: Metadata | None = None) -> Any:
    """An FsspecReader for the checkpoint folder `url` whose `.metadata` goes through `load_metadata`
    (or is `metadata`, read that way already: DCP would read and unpickle it again) and whose
    tensors, where `read_directly` allows (with `direct`, on the torch it was written for), are read
    straight into the live tensors.

    `direct_reads` on it counts those tensors. A read that fails for any reason but an outage of
    the storage raises DamagedCheckpoint."""
    direct = direct and direct_read.supported()
    given = metadata
    reader_class: Any = fsspec_io()[1]  # chosen at run time (public or private module): no static type

    class SafeFsspecReader(reader_class):
        metadata: Metadata | None = None
        direct_reads = 0

        def set_up_storage_reader(self, metadata: Metadata, *args: Any, **kwargs: Any) -> None:
            super().set_up_storage_reader(metadata, *args, **kwargs)
            self.metadata = metadata

        def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
            # DCP's reader reads everything before it returns its (completed) future.
            try:
                if direct:
                    plan = direct_read.read_directly(self, plan, planner, url)
                return super().read_data(plan, planner)
            except CheckpointError as e:  # ours: a record that is short, or a value weights_only refuses
                raise DamagedCheckpoint(f"The checkpoint {url} is damaged: {e}.") from None
            except Exception as e:
                if is_outage(e):
                    raise
                raise DamagedCheckpoint(f"The checkpoint {url} is damaged: reading it failed "
                                        f"({type(e).__name__}: {_first_sentence(e)}).") from None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            rank = kwargs.get("rank")
            if given is not None and rank is None:
                found = given
            else:
                name = ".metadata" if rank is None else f"__{rank}.metadata"
                with self.fs.create_stream(self.fs.concat_path(self.path, name), "rb") as f:
                    found = load_metadata(f, url)
            if found.storage_meta is None:
                found.storage_meta = StorageMeta()
            found.storage_meta.load_id = self.load_id
            return found

    return SafeFsspecReader(url)
