"""`igniter-dist checkpoints list|show|verify|export`: inspect checkpoints on one process.

Exit codes: 0 done; 1 `verify` found problems; 3 the checkpoint could not be found or read.
`list` marks damaged checkpoints (files missing or of another size than their manifest recorded).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Any

from ..errors import CheckpointError, DamagedCheckpoint, IgniterError
from . import layout
from .storage import Storage


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("list", help="List the checkpoints under a folder or URL, newest last.")
    p.add_argument("url", help="The checkpoint root (--checkpoint-dir), a folder or URL such as s3://bucket/run.")
    p.add_argument("--all", action="store_true", help="Also list uncommitted (incomplete) step folders.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    p = sub.add_parser("show", help="Print a checkpoint's manifest, files and tensors.")
    p.add_argument("url", help="A step folder (URL/step_N), or a root for its latest committed checkpoint.")
    p.add_argument("--json", action="store_true", help="Print JSON instead of text.")
    p = sub.add_parser("verify", help="Check that every file of a checkpoint is present with its recorded size.")
    p.add_argument("url", help="A step folder (URL/step_N), or a root for every committed checkpoint in it.")
    p.add_argument("--full", action="store_true", help="Also read every tensor and value back.")
    p = sub.add_parser("export", help="Write one process's consolidated model file (weights_only-loadable).")
    p.add_argument("url", help="A step folder (URL/step_N), or a root for its latest committed checkpoint.")
    p.add_argument("--to", required=True, help="Output file or URL: model.pt (torch.save) or model.safetensors.")
    p.add_argument("--key", default="model", help="Which saved object to export (the to_save name).")


def run(args: argparse.Namespace) -> int:
    return {"list": _list, "show": _show, "verify": _verify, "export": _export}[args.action](args)


def resolve(url: str) -> tuple[Storage, layout.Folder]:
    """The root storage and committed step folder named by `url` (a step folder or a root's latest)."""
    url = url.rstrip("/")
    head, _, last = url.rpartition("/")
    step = layout.parse_step(last)
    root = Storage(head if step is not None and head else url)
    try:
        folders = layout.group_folders(root.find())
    except IgniterError:
        raise
    except Exception as e:
        raise root.error("list checkpoints in", e) from None
    if step is None:
        committed = [s for s, f in folders.items() if f.committed]
        if not committed:
            raise CheckpointError(
                f"No committed checkpoint in {root.url}; pass a step folder such as {root.url}/step_N."
            )
        step = max(committed)
    folder = folders.get(step)
    if folder is None or not folder.committed:
        state = "is not committed (an interrupted or failed save)" if folder else "does not exist"
        raise CheckpointError(f"The checkpoint {url} {state}.")
    return root, folder


def read_manifest(root: Storage, folder: layout.Folder) -> dict[str, Any]:
    url = root.url_of(folder.name, layout.MANIFEST)
    try:
        return layout.decode_manifest(root.read_bytes(folder.name, layout.MANIFEST), url)
    except IgniterError:
        raise
    except Exception as e:
        raise root.error("read", e, url) from None


def _list(args: argparse.Namespace) -> int:
    root = Storage(args.url)
    try:
        folders = layout.group_folders(root.find())
        missing = not folders and not root.exists()
    except IgniterError:
        raise
    except Exception as e:
        raise root.error("list checkpoints in", e) from None
    if missing:
        raise CheckpointError(f"{root.url} does not exist; pass the --checkpoint-dir of a run (a folder or URL).")
    committed = [s for s, f in folders.items() if f.committed]
    latest = max(committed) if committed else None
    rows = []
    for step, f in sorted(folders.items()):
        if not f.committed and not args.all:
            continue
        m, problems = _manifest_and_problems(root, f) if f.committed else ({}, [])
        rows.append({"step": step, "folder": f.name, "committed": f.committed, "latest": step == latest,
                     "damaged": "; ".join(problems) or None, "time": m.get("time"),
                     "world_size": m.get("world_size"), "size": f.size, "metrics": m.get("metrics", {})})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"No committed checkpoint in {root.url}.")
        return 0
    print(f"{'step':>10}  {'status':<11}  {'time':<20}  {'ranks':>5}  {'size':>10}  metrics")
    for r in rows:
        status = "damaged" if r["damaged"] else "latest" if r["latest"] else (
            "committed" if r["committed"] else "uncommitted")
        metrics = ", ".join(f"{k}={v:.6g}" for k, v in sorted(r["metrics"].items()))
        print(f"{r['step']:>10}  {status:<11}  {r['time'] or '-':<20}  {r['world_size'] or '-':>5}  "
              f"{_size(r['size']):>10}  {metrics}")
        if r["damaged"]:
            print(f"{'':>10}  {r['damaged']}")
    return 0


def _manifest_and_problems(root: Storage, folder: layout.Folder) -> tuple[dict[str, Any], list[str]]:
    """A committed folder's manifest and what is wrong with its files ({} and the reason when the
    manifest itself is damaged)."""
    try:
        manifest = read_manifest(root, folder)
    except DamagedCheckpoint as e:
        return {}, [str(e)]
    return manifest, layout.file_problems(manifest, folder.files)


def _tensors(root: Storage, folder: layout.Folder) -> list[dict[str, Any]]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .safe_load import load_metadata

    url = root.url_of(folder.name)
    metadata = load_metadata(io.BytesIO(root.read_bytes(folder.name, layout.DCP_METADATA)), url)
    out = []
    for key, md in sorted(metadata.state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata):
            dtype = md.properties.dtype
            numel = 1
            for d in md.size:
                numel *= d
            out.append({"key": key, "dtype": str(dtype).replace("torch.", ""), "shape": list(md.size),
                        "bytes": numel * dtype.itemsize})
        else:
            out.append({"key": key, "dtype": "object", "shape": None, "bytes": None})
    return out


def _show(args: argparse.Namespace) -> int:
    root, folder = resolve(args.url)
    manifest = read_manifest(root, folder)
    tensors = _tensors(root, folder)
    if args.json:
        print(json.dumps({"url": root.url_of(folder.name), "manifest": manifest, "tensors": tensors}, indent=2))
        return 0
    print(f"checkpoint  {root.url_of(folder.name)}")
    for key in ("step", "time", "world_size"):
        print(f"{key:<11} {manifest.get(key)}")
    extras = {k: v for k, v in manifest.items() if k not in layout.RESERVED}
    for key, value in extras.items():
        print(f"{key:<11} {json.dumps(value, default=str)[:200]}")
    print("versions    " + ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items()))
    print("metrics     " + (", ".join(f"{k}={v:.6g}" for k, v in sorted(manifest.get("metrics", {}).items())) or "-"))
    print(f"files       {len(manifest.get('files', []))}, {_size(sum(f['size'] for f in manifest.get('files', [])))}")
    for f in manifest.get("files", []):
        print(f"  {f['name']:<24} {_size(f['size']):>10}")
    print(f"values      {len(tensors)}")
    for t in tensors:
        shape = "x".join(map(str, t["shape"])) if t["shape"] is not None else ""
        print(f"  {t['key']:<48} {t['dtype']:<9} {shape:<14} {_size(t['bytes']) if t['bytes'] is not None else ''}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """A step folder: that checkpoint; a root: every committed checkpoint in it."""
    url = args.url.rstrip("/")
    if layout.parse_step(url.rpartition("/")[2]) is not None:
        checked = [resolve(url)]
    else:
        root, _ = resolve(url)  # CheckpointError when nothing is committed
        folders = layout.group_folders(root.find())
        checked = [(root, f) for _, f in sorted(folders.items()) if f.committed]
    damaged = 0
    for root, folder in checked:
        step_url = root.url_of(folder.name)
        problems = verify(root, folder, full=args.full)
        damaged += bool(problems)
        for p in problems:
            print(f"FAIL {step_url}: {p}")
        if not problems:
            print(f"OK {step_url}: every file present with its recorded size"
                  + (", every value readable." if args.full else "."))
    if damaged:
        print(f"{damaged} of {len(checked)} checkpoint(s) damaged.", file=sys.stderr)
        return 1
    return 0


def verify(root: Storage, folder: layout.Folder, *, full: bool = False) -> list[str]:
    """The problems found in a committed checkpoint (empty when it is whole)."""
    from .safe_load import load_metadata

    url = root.url_of(folder.name)
    present = root.find(folder.name)
    try:
        manifest = read_manifest(root, folder)
    except DamagedCheckpoint as e:
        return [str(e)]
    problems = layout.file_problems(manifest, present)
    if problems:
        return problems
    try:
        metadata = load_metadata(io.BytesIO(root.read_bytes(folder.name, layout.DCP_METADATA)), url)
    except IgniterError as e:
        return [str(e)]
    for info in (metadata.storage_data or {}).values():
        size = present.get(info.relative_path)
        if size is None:
            problems.append(f"{info.relative_path} is referenced by {layout.DCP_METADATA} but missing")
        elif info.offset + info.length > size:
            problems.append(f"{info.relative_path} is shorter than {layout.DCP_METADATA} expects")
    if full and not problems:
        problems.extend(_read_all(url, metadata))
    return sorted(set(problems))


def _read_all(url: str, metadata: Any) -> list[str]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from .safe_load import SafeLoadPlanner, safe_reader
    from .state import buffers_for, quiet_single_process
    from .storage import root_cause

    template = buffers_for(metadata.state_dict_metadata, sorted(metadata.state_dict_metadata))
    try:
        with quiet_single_process(False):
            dcp.load(template, storage_reader=safe_reader(url), planner=SafeLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as e:
        cause = root_cause(e)
        return [f"reading it failed: {cause if isinstance(cause, IgniterError) else repr(cause)}"]
    return []


def _export(args: argparse.Namespace) -> int:
    from .export import consolidate, write_state

    root, folder = resolve(args.url)
    url = root.url_of(folder.name)
    state = consolidate(url, args.key)
    write_state(state, args.to)
    n = sum(1 for v in state.values() if hasattr(v, "numel"))
    print(f"Exported {n} tensors of {args.key!r} from {url} to {args.to}.")
    return 0


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)
