"""Inside a SageMaker training job: the container contract (SM_* variables, /opt/ml files).

SageMaker's training toolkit sets SM_* variables; a bring-your-own container sees only the files
under /opt/ml and TRAINING_JOB_NAME, so every answer here falls back to the files. Nothing here
imports the sagemaker SDK or boto3; the launcher lives in `igniter_dist.sagemaker.launcher`.

Test hooks (read here, nowhere else): SAGEMAKER_BASE_DIR replaces /opt/ml, and
SAGEMAKER_HOST_ADDRESSES (`algo-1=127.0.0.1,algo-2=127.0.0.1`) maps host names to addresses, so a
two-host job can run on one machine without editing /etc/hosts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DEFAULT_BASE_DIR = "/opt/ml"
MASTER_PORT = 7777  # the port SageMaker's own torchrun launcher uses
CHECKPOINT_HYPERPARAMETERS = ("checkpoint-dir", "checkpoint_dir")
JOB_KEY = "--sagemaker_"  # SageMaker's own hyperparameters: sagemaker_program, sagemaker_region, ...
OLD_FLAG = "--sagemaker-"  # pytorch-igniter's job flags: --sagemaker-run, --sagemaker-instance-type, ...
LAUNCH = "igniter-dist launch sagemaker SCRIPT [OPTIONS] [-- SCRIPT_ARGS]"
RESOLVE_TIMEOUT_S = 60.0  # DNS of a fresh cluster lags seconds, not minutes


@dataclass(frozen=True)
class ResourceConfig:
    """The cluster as resourceconfig.json describes it; `hosts` sorted (algo-1, algo-2, ...)."""

    current_host: str
    hosts: tuple[str, ...]
    network_interface_name: str | None = None

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def master_host(self) -> str:
        return self.hosts[0]


def base_dir() -> Path:
    """The job's root folder: /opt/ml, or SAGEMAKER_BASE_DIR (tests)."""
    return Path(os.environ.get("SAGEMAKER_BASE_DIR") or DEFAULT_BASE_DIR)


def config_dir() -> Path:
    return base_dir() / "input" / "config"


def _read_config(name: str) -> Any:
    path = config_dir() / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read SageMaker's {path} ({e}); the job's container layout is broken.") from None


def in_sagemaker() -> bool:
    """True inside a SageMaker training container (toolkit variables, the job name, or its files)."""
    return bool(
        os.environ.get("SM_CURRENT_HOST")
        or os.environ.get("TRAINING_JOB_NAME")
        or (config_dir() / "resourceconfig.json").is_file()
    )


def host_key(host: str) -> tuple[int, str]:
    """Sort key putting algo-2 before algo-10, as SageMaker numbers its hosts."""
    prefix, _, num = host.rpartition("-")
    return (int(num), prefix) if num.isdigit() else (0, host)


def resource_config() -> ResourceConfig | None:
    """This host and all hosts, from resourceconfig.json (or SM_CURRENT_HOST / SM_HOSTS); None outside a job."""
    raw = _read_config("resourceconfig.json")
    if raw is None and os.environ.get("SM_CURRENT_HOST"):
        raw = {"current_host": os.environ["SM_CURRENT_HOST"],
               "hosts": json.loads(os.environ.get("SM_HOSTS") or "[]") or [os.environ["SM_CURRENT_HOST"]]}
    if raw is None:
        return None
    hosts = tuple(sorted(raw.get("hosts") or [], key=lambda h: (host_key(h), h)))
    current = raw.get("current_host")
    if current not in hosts:
        raise ConfigError(f"SageMaker's current host {current!r} is not among its hosts {list(hosts)}; "
                          "resourceconfig.json is inconsistent.")
    return ResourceConfig(current, hosts, raw.get("network_interface_name"))


def _as_string(value: Any) -> str:
    # hyperparameters.json holds strings; SDK v2 JSON-encodes them once more ("\"adam\"").
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str):
        return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, str) else value
    return value


def hyperparameters() -> dict[str, str]:
    """The job's hyperparameters as strings, SageMaker's own `sagemaker_*` keys included."""
    raw = _read_config("hyperparameters.json")
    if raw is None and os.environ.get("SM_HPS"):
        raw = json.loads(os.environ["SM_HPS"])
    return {str(k): _as_string(v) for k, v in (raw or {}).items()}


def script_hyperparameters(hps: dict[str, str]) -> list[str]:
    """`--key value` arguments for the script, SageMaker's `sagemaker_*` keys left out."""
    argv: list[str] = []
    for key, value in hps.items():
        if not key.startswith("sagemaker_"):
            argv += [f"--{key}", value]
    return argv


def script_leftovers(unknown: list[str]) -> list[str]:
    """The arguments a script's parser did not know, less SageMaker's own `--sagemaker_*` keys inside a job.

    Raises:
        ConfigError: for a pytorch-igniter `--sagemaker-*` flag anywhere, or a `--sagemaker_*` key
            outside a job, naming what replaces it.
    """
    inside = in_sagemaker()
    leftovers: list[str] = []
    dropped_key = False
    for tok in unknown:
        if dropped_key and not tok.startswith("--"):
            dropped_key = False
            continue  # the value of the key just dropped
        dropped_key = False
        key = tok.split("=", 1)[0]
        if key.startswith(JOB_KEY) and inside:
            dropped_key = "=" not in tok
        elif key.startswith(OLD_FLAG):
            raise ConfigError(f"{key} is a pytorch-igniter flag that igniter-dist does not take: "
                              f"launch SageMaker jobs with `{LAUNCH}`.")
        elif key.startswith(JOB_KEY):
            raise ConfigError(f"{key} is one of SageMaker's own hyperparameters, ignored only inside a training "
                              f"job; drop it here, or launch a job with `{LAUNCH}`.")
        else:
            leftovers.append(tok)
    return leftovers


def channels() -> list[str]:
    """The job's input channel names, from inputdataconfig.json or the folders under input/data."""
    raw = _read_config("inputdataconfig.json")
    if raw is not None:
        return sorted(raw)
    data = base_dir() / "input" / "data"
    return sorted(p.name for p in data.iterdir() if p.is_dir()) if data.is_dir() else []


def model_dir() -> str | None:
    """Where SageMaker uploads the model from (SM_MODEL_DIR, or /opt/ml/model), inside a job."""
    if os.environ.get("SM_MODEL_DIR"):
        return os.environ["SM_MODEL_DIR"]
    return str(base_dir() / "model") if in_sagemaker() else None


def output_dir() -> str | None:
    """Where SageMaker uploads other outputs from (SM_OUTPUT_DATA_DIR, or /opt/ml/output/data), inside a job."""
    if os.environ.get("SM_OUTPUT_DATA_DIR"):
        return os.environ["SM_OUTPUT_DATA_DIR"]
    return str(base_dir() / "output" / "data") if in_sagemaker() else None


def channel_dir(name: str) -> str | None:
    """The local folder of input channel `name` (SM_CHANNEL_<NAME>, or /opt/ml/input/data/<name>), inside a job."""
    if os.environ.get(f"SM_CHANNEL_{name.upper()}"):
        return os.environ[f"SM_CHANNEL_{name.upper()}"]
    if in_sagemaker() and name in channels():
        return str(base_dir() / "input" / "data" / name)
    return None


def checkpoint_dir() -> str | None:
    """The job's checkpoint location: an s3:// URL hyperparameter, else /opt/ml/checkpoints; None outside a job.

    /opt/ml/checkpoints is the folder SageMaker syncs with the job's checkpoint S3 URI.
    """
    if not in_sagemaker():
        return None
    hps = hyperparameters()
    for key in CHECKPOINT_HYPERPARAMETERS:
        if hps.get(key, "").startswith("s3://"):
            return hps[key]
    return str(base_dir() / "checkpoints")


def job_name() -> str | None:
    """The training job's name (TRAINING_JOB_NAME, set by the platform), inside a job."""
    if os.environ.get("TRAINING_JOB_NAME"):
        return os.environ["TRAINING_JOB_NAME"]
    env = os.environ.get("SM_TRAINING_ENV")
    if env:
        try:
            return json.loads(env).get("job_name") or None
        except ValueError:
            return None
    return None


def num_gpus() -> int | None:
    """GPUs per instance as the toolkit reports them (SM_NUM_GPUS); None when not set."""
    value = os.environ.get("SM_NUM_GPUS")
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"SM_NUM_GPUS must be a whole number, got {value!r}.") from None


def master_port() -> int:
    """The rendezvous port: 7777 as in SageMaker's own launcher, or SM_MASTER_PORT (tests)."""
    value = os.environ.get("SM_MASTER_PORT") or str(MASTER_PORT)
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"SM_MASTER_PORT must be a port number, got {value!r}.") from None


def resolve_timeout() -> float:
    """Seconds the entrypoint waits for the master host's name to resolve: IGNITER_DIST_RESOLVE_TIMEOUT, else 60."""
    value = os.environ.get("IGNITER_DIST_RESOLVE_TIMEOUT") or str(RESOLVE_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"IGNITER_DIST_RESOLVE_TIMEOUT must be a positive number of seconds, got {value!r}.")
    return seconds


def host_address(host: str) -> str:
    """The address to reach `host` at: its name (SageMaker's DNS resolves it), or SAGEMAKER_HOST_ADDRESSES' entry."""
    mapping = os.environ.get("SAGEMAKER_HOST_ADDRESSES", "")
    for pair in filter(None, (p.strip() for p in mapping.split(","))):
        name, sep, address = pair.partition("=")
        if not sep:
            raise ConfigError(f"SAGEMAKER_HOST_ADDRESSES expects host=address pairs separated by commas, got {pair!r}.")
        if name.strip() == host:
            return address.strip()
    return host


def write_failure(message: str) -> None:
    """Leave `message` in /opt/ml/output/failure, which SageMaker reports as the job's FailureReason."""
    path = base_dir() / "output" / "failure"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(message + "\n")
    except OSError:
        pass  # best effort: the message is on stderr, in the job's log, as well


def code_dir() -> Path:
    """Where the job's source code is unpacked (/opt/ml/code)."""
    return base_dir() / "code"


def code_archive() -> Path | None:
    """The uploaded sourcedir.tar.gz in the `code` input channel, when the launcher sent one."""
    path = base_dir() / "input" / "data" / "code" / "sourcedir.tar.gz"
    return path if path.is_file() else None


def toolkit_environment(config: ResourceConfig, num_gpus: int) -> dict[str, str]:
    """The SM_* variables SageMaker's training toolkit would set, for scripts that read them.

    Variables already set (by the toolkit itself) are left out, so they win.
    """
    env = {
        "SM_CURRENT_HOST": config.current_host,
        "SM_HOSTS": json.dumps(list(config.hosts)),
        "SM_NUM_GPUS": str(num_gpus),
        "SM_MODEL_DIR": str(base_dir() / "model"),
        "SM_OUTPUT_DATA_DIR": str(base_dir() / "output" / "data"),
        "SM_CHANNELS": json.dumps(channels()),
    }
    for name in channels():
        env[f"SM_CHANNEL_{name.upper()}"] = str(base_dir() / "input" / "data" / name)
    if config.network_interface_name:  # as the toolkit does, so NCCL uses the job's network
        env["NCCL_SOCKET_IFNAME"] = config.network_interface_name
    return {k: v for k, v in env.items() if not os.environ.get(k)}
