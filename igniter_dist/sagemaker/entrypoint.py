"""`igniter-dist sagemaker-entrypoint`: run a script under torchrun on every host of a SageMaker job.

Each host reads resourceconfig.json, takes node rank = its index among the sorted hosts, waits
for the master host's name to resolve, and replaces itself (exec) with `python -m
torch.distributed.run`, so SageMaker's SIGTERM on stop or spot interruption reaches torchrun,
which forwards it to the workers.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import socket
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, IgniterError
from ..redaction import REDACTED, is_secret
from ..values import positive_float
from . import contract

# SageMaker starts a bring-your-own container as `docker run IMAGE train`.
TRAIN_WORD = "train"


@dataclass(frozen=True)
class NodePlan:
    """What torchrun runs on this host."""

    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int
    script: str
    script_args: tuple[str, ...]


def plan_node(
    config: contract.ResourceConfig,
    hyperparameters: dict[str, str],
    script: str,
    script_args: list[str],
    nproc_per_node: int,
    master_port: int,
    master_addr: str | None = None,
) -> NodePlan:
    """The torchrun plan for this host: hyperparameters become `--key value` after the given arguments."""
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be at least 1, got {nproc_per_node}.")
    return NodePlan(
        nnodes=len(config.hosts),
        node_rank=config.node_rank,
        nproc_per_node=nproc_per_node,
        master_addr=master_addr or config.master_host,
        master_port=master_port,
        script=script,
        script_args=(*script_args, *contract.script_hyperparameters(hyperparameters)),
    )


def torchrun_argv(plan: NodePlan, python: str = sys.executable) -> list[str]:
    """The command this host execs: static rendezvous at the first host, one agent per host."""
    return [
        python, "-m", "torch.distributed.run",
        f"--nnodes={plan.nnodes}",
        f"--node-rank={plan.node_rank}",
        f"--nproc-per-node={plan.nproc_per_node}",
        f"--master-addr={plan.master_addr}",
        f"--master-port={plan.master_port}",
        plan.script, *plan.script_args,
    ]


def display(argv: list[str]) -> str:
    """The command as one line for the log, values of secret-looking `--key value` flags redacted."""
    shown = list(argv)
    for i, tok in enumerate(shown):
        if not tok.startswith("--") or not is_secret(tok.split("=", 1)[0]):
            continue
        if "=" in tok:
            shown[i] = f"{tok.split('=', 1)[0]}={REDACTED}"
        elif i + 1 < len(shown):
            shown[i + 1] = REDACTED
    return shlex.join(shown)


def resolve_script(script: str | None, hyperparameters: dict[str, str]) -> str:
    """The script to run: the argument, or the `sagemaker_program` hyperparameter when started as `train`."""
    if script and script != TRAIN_WORD:
        return script
    program = hyperparameters.get("sagemaker_program")
    if not program:
        raise ConfigError("no script to run: pass SCRIPT to igniter-dist sagemaker-entrypoint "
                          "or set the sagemaker_program hyperparameter (igniter-dist launch sagemaker does).")
    return program


def unpack_code(archive: Path, target: Path) -> None:
    """Extract the launcher's sourcedir.tar.gz into `target` (refusing paths that leave it)."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
        else:  # Python without PEP 706: check member paths by hand
            root = target.resolve()
            for member in tar.getmembers():
                dest = (target / member.name).resolve()
                if root not in (dest, *dest.parents) or member.issym() or member.islnk():
                    raise ConfigError(f"{archive} holds an unsafe member {member.name!r}; rebuild the source archive.")
            tar.extractall(target)


def wait_for_host(host: str, timeout_s: float) -> None:
    """Return once `host` resolves, retrying with a short backoff: a fresh cluster's DNS may lag seconds.

    Raises:
        ConfigError: when it still does not resolve after `timeout_s` (torchrun would retry for many minutes).
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    for attempt in itertools.count():
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            return
        except OSError as e:  # socket.gaierror: no such name, or no answer yet
            error = e
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if attempt == 0:
            print(f"igniter-dist: waiting up to {timeout_s:g} s for the master host {host} to resolve",
                  file=sys.stderr, flush=True)
        time.sleep(min(delay, remaining))
        delay = min(2 * delay, 5.0)
    raise ConfigError(f"the master host {host} did not resolve within {timeout_s:g} s ({error.strerror or error}); "
                      "if the job runs in a VPC, enable DNS resolution and DNS hostnames there, "
                      "or raise --resolve-timeout / IGNITER_DIST_RESOLVE_TIMEOUT.")


def _gpu_count() -> int:
    known = contract.num_gpus()
    if known is not None:
        return known
    import torch  # only when the toolkit did not say; this process is replaced right after

    return torch.cuda.device_count()


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="Processes per host (default: SM_NUM_GPUS, else the GPUs seen, at least 1).")
    parser.add_argument("--master-port", type=int, default=None,
                        help="Rendezvous port on the first host (default: 7777, or SM_MASTER_PORT).")
    parser.add_argument("--resolve-timeout", type=positive_float, default=None, metavar="SECONDS",
                        help="How long to wait for the master host's name to resolve before failing "
                             "(default: IGNITER_DIST_RESOLVE_TIMEOUT, else 60).")
    parser.add_argument("--print-only", action="store_true",
                        help="Print the torchrun command instead of running it.")
    parser.add_argument("script", nargs="?", default=None,
                        help="Script to run; omitted or 'train' means the sagemaker_program hyperparameter.")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="Arguments for the script.")


def run(args: argparse.Namespace) -> int:
    config = contract.resource_config()
    if config is None:
        raise ConfigError(f"not inside a SageMaker job: {contract.config_dir() / 'resourceconfig.json'} is missing "
                          "(set SAGEMAKER_BASE_DIR to a folder laid out as /opt/ml to simulate one).")
    try:
        argv, plan, gpus = _prepare(args, config)
        if args.print_only:
            print(display(argv))
            return 0
        wait_for_host(plan.master_addr, args.resolve_timeout or contract.resolve_timeout())
    except IgniterError as e:
        contract.write_failure(str(e))  # SageMaker shows it as the job's FailureReason
        raise
    print(f"igniter-dist: host {config.current_host} is node {plan.node_rank} of {plan.nnodes}: {display(argv)}",
          file=sys.stderr, flush=True)
    env = {**os.environ, **contract.toolkit_environment(config, gpus)}
    os.execve(argv[0], argv, env)  # never returns: torchrun takes this PID and its signals
    return 0  # pragma: no cover


def _prepare(args: argparse.Namespace, config: contract.ResourceConfig) -> tuple[list[str], NodePlan, int]:
    """The torchrun command for this host, its plan and the GPUs seen; the job's code unpacked into /opt/ml/code."""
    hps = contract.hyperparameters()
    script = resolve_script(args.script, hps)
    archive = contract.code_archive()
    if archive is not None:
        unpack_code(archive, contract.code_dir())
        os.chdir(contract.code_dir())
    gpus = _gpu_count()
    plan = plan_node(
        config, hps, script, list(args.script_args),
        nproc_per_node=args.nproc_per_node or max(1, gpus),
        master_port=args.master_port or contract.master_port(),
        master_addr=contract.host_address(config.master_host),
    )
    return torchrun_argv(plan), plan, gpus
