"""`igniter-dist launch sagemaker`: build a SageMaker training job request, send it, follow its status.

The request is built here as plain CreateTrainingJob JSON (printed by `--dry-run`) and sent with
boto3, imported lazily: every field the job gets is visible, and the container runs
`igniter-dist sagemaker-entrypoint`, which execs torchrun so SageMaker's SIGTERM reaches the workers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigError
from ..helptext import HelpFormatter
from ..values import FALSE, TRUE, parse_bool, positive_int

CODE_CHANNEL = "code"  # the entrypoint unpacks <channel>/sourcedir.tar.gz into /opt/ml/code
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
# SageMaker sends SIGTERM and kills 120 s later; torchrun must SIGKILL its workers before that,
# leaving them most of the window to finish the checkpoint they save on SIGTERM.
SHUTDOWN_TIMEOUT_S = 90
EXCLUDED = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", ".mypy_cache", ".pytest_cache",
            ".ipynb_checkpoints", "node_modules", ".DS_Store"}
TERMINAL = {"Completed", "Failed", "Stopped"}
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_CHANNEL = re.compile(r"^[A-Za-z0-9.\-_]{1,64}$")
_ROLE = re.compile(r"^arn:aws[a-z\-]*:iam::(\d{12}):role/.+$")
SWITCHES = ("--spot", "--dry-run", "--wait")  # booleans that may stand alone: `--dry-run` is `--dry-run true`
USAGE = "igniter-dist launch sagemaker SCRIPT [OPTIONS] [-- SCRIPT_ARGS]"
DESCRIPTION = """Create a SageMaker training job that runs SCRIPT under torchrun on every instance.
Options may come before or after SCRIPT; the script's own arguments follow --, each as --key value."""
EXAMPLE = """example (prints the request, sends nothing):
  igniter-dist launch sagemaker train.py --instance-count 2 --instance-type ml.g5.12xlarge \\
      --image ECR_IMAGE_URI --role ROLE_ARN --region us-east-1 --spot --dry-run -- --max-epochs 10"""


@dataclass(frozen=True)
class JobSpec:
    """Everything a SageMaker training job is made of, validated once."""

    job_name: str
    image: str
    role: str
    region: str
    instance_type: str
    instance_count: int
    volume_size_gb: int
    max_run_s: int
    spot: bool
    max_wait_s: int | None
    checkpoint_s3_uri: str | None
    checkpoint_mode: str  # "sync" (SageMaker copies /opt/ml/checkpoints) or "direct" (ranks write to S3)
    s3_prefix: str
    program: str  # the script, relative to the source dir
    hyperparameters: dict[str, str]
    inputs: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def code_uri(self) -> str:
        return f"{self.s3_prefix}/{self.job_name}/source/sourcedir.tar.gz"


def _s3_channel(name: str, uri: str) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                                        "S3DataDistributionType": "FullyReplicated"}},
        "InputMode": "File",
    }


def build_request(spec: JobSpec) -> dict[str, Any]:
    """The CreateTrainingJob request for `spec`, exactly as it is sent."""
    hps = dict(spec.hyperparameters)
    hps["sagemaker_program"] = spec.program
    if spec.checkpoint_s3_uri and spec.checkpoint_mode == "direct":
        hps["checkpoint-dir"] = spec.checkpoint_s3_uri
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": spec.max_run_s}
    if spec.spot:
        stopping["MaxWaitTimeInSeconds"] = spec.max_wait_s or spec.max_run_s
    request: dict[str, Any] = {
        "TrainingJobName": spec.job_name,
        "RoleArn": spec.role,
        "AlgorithmSpecification": {
            "TrainingImage": spec.image,
            "TrainingInputMode": "File",
            "ContainerEntrypoint": ["igniter-dist", "sagemaker-entrypoint"],
            "ContainerArguments": [spec.program],
        },
        "HyperParameters": hps,
        "InputDataConfig": [_s3_channel(CODE_CHANNEL, spec.code_uri)]
        + [_s3_channel(name, uri) for name, uri in sorted(spec.inputs.items())],
        "OutputDataConfig": {"S3OutputPath": f"{spec.s3_prefix}/output"},
        "ResourceConfig": {"InstanceType": spec.instance_type, "InstanceCount": spec.instance_count,
                           "VolumeSizeInGB": spec.volume_size_gb},
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": spec.spot,
        "Environment": {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT_S), "PYTHONUNBUFFERED": "1",
                        **spec.environment},
    }
    if spec.checkpoint_s3_uri and spec.checkpoint_mode == "sync":
        request["CheckpointConfig"] = {"S3Uri": spec.checkpoint_s3_uri, "LocalPath": CHECKPOINT_LOCAL_PATH}
    return request


def script_hyperparameters(argv: list[str]) -> dict[str, str]:
    """`--key value` / `--key=value` script arguments as SageMaker hyperparameters (all strings)."""
    hps: dict[str, str] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"script argument {tok!r} is not a --key value pair; SageMaker passes only "
                              "hyperparameters, so give every script argument as --key value.")
        if "=" in tok:
            key, value = tok[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = tok[2:], argv[i + 1]
            i += 2
        else:
            raise ConfigError(f"script flag {tok} has no value; SageMaker passes hyperparameters as "
                              f"--key value, so write {tok} true.")
        if len(key) > 256 or len(value) > 2500:
            raise ConfigError(f"hyperparameter {key[:40]!r} is too long for SageMaker (keys 256, values 2500 "
                              "characters); pass large values as an input channel.")
        hps[key] = value
    if len(hps) > 95:
        raise ConfigError(f"{len(hps)} script arguments exceed SageMaker's 100 hyperparameters; "
                          "move settings into a config file in the source dir.")
    return hps


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    """`NAME=VALUE` flags (`--input data=s3://...`, `--env K=V`) as a dict."""
    out: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"{flag} expects NAME=VALUE, got {item!r}.")
        out[name] = value
    return out


def default_job_name(script: str, now: float | None = None) -> str:
    stem = re.sub(r"[^a-zA-Z0-9]+", "-", Path(script).stem).strip("-") or "igniter"
    return f"{stem[:40]}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"


def make_archive(source_dir: Path, dest: Path) -> Path:
    """Pack `source_dir` into sourcedir.tar.gz, skipping version control, caches and virtualenvs."""
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        return None if any(p in EXCLUDED for p in parts) or info.name.endswith(".pyc") else info

    with tarfile.open(dest, "w:gz") as tar:
        for child in sorted(source_dir.iterdir()):
            tar.add(child, arcname=child.name, filter=keep)
    return dest


def _boto3():
    try:
        import boto3
    except ImportError:
        raise ConfigError("launching on SageMaker needs boto3: pip install 'igniter-dist[sagemaker]'.") from None
    return boto3


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def send(spec: JobSpec, request: dict[str, Any], source_dir: Path) -> str:
    """Upload the source archive, create the job; returns its ARN."""
    boto3 = _boto3()
    with tempfile.TemporaryDirectory() as tmp:
        archive = make_archive(source_dir, Path(tmp) / "sourcedir.tar.gz")
        bucket, key = _split_s3(spec.code_uri)
        boto3.client("s3", region_name=spec.region).upload_file(str(archive), bucket, key)
    client = boto3.client("sagemaker", region_name=spec.region)
    return client.create_training_job(**request)["TrainingJobArn"]


def follow(job_name: str, region: str, poll_s: float, out: TextIO | None = None) -> int:
    """Print the job's status as it changes until it ends; 0 when it completed."""
    out = out or sys.stdout
    client = _boto3().client("sagemaker", region_name=region)
    seen = None
    while True:
        job = client.describe_training_job(TrainingJobName=job_name)
        status = (job["TrainingJobStatus"], job.get("SecondaryStatus"))
        if status != seen:
            seen = status
            transitions = job.get("SecondaryStatusTransitions") or [{}]
            message = transitions[-1].get("StatusMessage")
            print(f"{job_name}: {status[0]} ({status[1]})" + (f": {message}" if message else ""), file=out, flush=True)
        if status[0] in TERMINAL:
            if status[0] != "Completed":
                print(f"{job_name}: {job.get('FailureReason', 'no reason given')}", file=out, flush=True)
            else:
                print(f"{job_name}: model at {job.get('ModelArtifacts', {}).get('S3ModelArtifacts')}",
                      file=out, flush=True)
            return 0 if status[0] == "Completed" else 1
        time.sleep(poll_s)


class _LaunchParser(argparse.ArgumentParser):
    """Reads `SCRIPT [OPTIONS] [-- SCRIPT_ARGS]`, options before or after SCRIPT, a bare switch meaning true."""

    def parse_known_args(self, args: Iterable[str] | None = None, namespace: Any = None) -> tuple[Any, list[str]]:
        argv = list(sys.argv[1:] if args is None else args)
        head, tail = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
        parsed, extra = super().parse_known_args(_spell_out_switches(head), namespace)
        if extra:  # a usage error (exit 2), not left for the caller to ignore
            self.error(_unrecognized(head, extra))
        parsed.script_args = tail
        return parsed, []


def _spell_out_switches(argv: list[str]) -> list[str]:
    """`--dry-run` not followed by true/false becomes `--dry-run=true`, so it never takes SCRIPT as its value."""
    return [f"{tok}=true" if tok in SWITCHES and nxt.strip().lower() not in TRUE | FALSE else tok
            for tok, nxt in pairwise([*argv, ""])]


def _unrecognized(argv: list[str], extra: list[str]) -> str:
    for flag, value in pairwise(argv):
        if flag in SWITCHES and value in extra and not value.startswith("-"):  # `--spot maybe`: `maybe` left over
            return f"argument {flag}: expected true or false, got {value!r}"
    options = [tok for tok in extra if tok.startswith("-")]  # `--bogus 1 SCRIPT` leaves --bogus and SCRIPT over
    return f"unrecognized arguments: {' '.join(options or extra)} (the script's own arguments go after --)"


def _switch(p: argparse.ArgumentParser, flag: str, default: bool, text: str) -> None:
    p.add_argument(flag, type=parse_bool, nargs="?", const=True, default=default, metavar="{true,false}", help=text)


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instance-count", type=positive_int, default=1, metavar="N", help="Instances (nodes) in the job.")
    p.add_argument("--instance-type", default=None, metavar="TYPE",
                   help="SageMaker instance type, e.g. ml.g5.12xlarge (required).")
    p.add_argument("--image", default=None, metavar="URI",
                   help="ECR URI of an image with igniter-dist installed (required; see docker/README.md).")
    p.add_argument("--role", default=None, metavar="ARN", help="ARN of the IAM role the job runs as (required).")
    p.add_argument("--region", default=None,
                   help="AWS region (default: the boto3 session's region, read from the AWS configuration).")
    p.add_argument("--job-name", default=None, metavar="NAME", help="Training job name (default: <script>-<UTC time>).")
    p.add_argument("--source-dir", default=None, metavar="DIR",
                   help="Folder uploaded as the job's code (default: the script's folder).")
    p.add_argument("--s3-prefix", default=None, metavar="S3_URI",
                   help="s3:// prefix for code and output (default: s3://sagemaker-<region>-<account>/igniter-dist).")
    p.add_argument("--input", action="append", default=[], metavar="NAME=S3_URI",
                   help="An input channel; the script gets --NAME pointing at its local copy. Repeatable.")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="An environment variable for the job's processes. Repeatable.")
    _switch(p, "--spot", False, "Run on managed spot instances.")
    p.add_argument("--max-run", type=positive_int, default=86400, metavar="SECONDS", help="Seconds the job may train.")
    p.add_argument("--max-wait", type=positive_int, default=None, metavar="SECONDS",
                   help="Seconds the job may take including waits for spot capacity (spot only; default: --max-run).")
    p.add_argument("--checkpoint-s3-uri", default=None, metavar="S3_URI",
                   help="s3:// location of the job's checkpoints; kept across spot restarts.")
    p.add_argument("--checkpoint-mode", choices=["auto", "sync", "direct"], default="auto",
                   help="sync: ranks write /opt/ml/checkpoints and SageMaker copies it to S3; direct: ranks write to "
                        "the S3 URI (every node sees every shard, commit marker last); auto: sync on 1 instance, "
                        "direct on more.")
    p.add_argument("--volume-size", type=positive_int, default=30, metavar="GB", help="GB of disk per instance.")
    _switch(p, "--dry-run", False, "Print the request as JSON and send nothing.")
    _switch(p, "--wait", True, "Follow the job's status until it ends.")
    p.add_argument("--poll", type=float, default=30.0, metavar="SECONDS", help="Seconds between status checks.")


def register(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "igniter-dist launch sagemaker --help lists that target's options."
    sub = parser.add_subparsers(dest="target", required=True, metavar="TARGET", parser_class=_LaunchParser)
    sm = sub.add_parser(
        "sagemaker", help="A SageMaker training job: SCRIPT under torchrun on every instance, spot included.",
        usage=USAGE, description=DESCRIPTION, epilog=EXAMPLE, formatter_class=HelpFormatter, allow_abbrev=False)
    sm.add_argument("script", metavar="SCRIPT", help="The training script, inside --source-dir.")
    _add_options(sm)


def _region(given: str | None) -> str:
    if given:
        return given
    region = _boto3().session.Session().region_name
    if not region:
        raise ConfigError("no AWS region found: pass --region or set AWS_DEFAULT_REGION.")
    return region


def job_spec(args: argparse.Namespace, script_args: list[str]) -> tuple[JobSpec, Path]:
    """Validate the launch flags into a JobSpec and the source folder to upload."""
    for flag in ("instance_type", "image", "role"):
        if not getattr(args, flag):
            raise ConfigError(f"--{flag.replace('_', '-')} is required to launch on SageMaker"
                              + ("; build and push docker/Dockerfile (docker/README.md)." if flag == "image" else "."))
    role = _ROLE.match(args.role)
    if not role:
        raise ConfigError(f"--role must be an IAM role ARN like arn:aws:iam::123456789012:role/Name, "
                          f"got {args.role!r}.")
    script = Path(args.script)
    source_dir = Path(args.source_dir) if args.source_dir else script.resolve().parent
    if not source_dir.is_dir():
        raise ConfigError(f"--source-dir {source_dir} is not a folder.")
    try:
        program = script.resolve().relative_to(source_dir.resolve()).as_posix()
    except ValueError:
        raise ConfigError(f"the script {script} is not inside --source-dir {source_dir}; "
                          "pass the folder that holds it.") from None
    if not (source_dir / program).is_file():
        raise ConfigError(f"the script {script} does not exist.")
    job_name = args.job_name or default_job_name(program)
    if not _JOB_NAME.match(job_name):
        raise ConfigError(f"--job-name {job_name!r} must be 1-63 letters, digits and hyphens, "
                          "starting with a letter or digit.")
    if args.max_wait is not None and not args.spot:
        raise ConfigError("--max-wait applies to spot jobs only; add --spot or drop --max-wait.")
    if args.max_wait is not None and args.max_wait < args.max_run:
        raise ConfigError(f"--max-wait {args.max_wait} must be at least --max-run {args.max_run}.")
    inputs = parse_pairs(args.input, "--input")
    for name, uri in inputs.items():
        if not _CHANNEL.match(name) or name == CODE_CHANNEL:
            raise ConfigError(f"--input name {name!r} must be letters, digits, '.', '-' or '_' and not "
                              f"{CODE_CHANNEL!r} (the source code's channel).")
        if not uri.startswith("s3://"):
            raise ConfigError(f"--input {name}={uri} must be an s3:// URI; upload local data to S3 first.")
    hps = script_hyperparameters(script_args)
    if args.checkpoint_s3_uri and not args.checkpoint_s3_uri.startswith("s3://"):
        raise ConfigError(f"--checkpoint-s3-uri must start with s3://, got {args.checkpoint_s3_uri!r}.")
    mode = args.checkpoint_mode
    if mode == "auto":
        mode = "sync" if args.instance_count == 1 else "direct"
    if args.checkpoint_s3_uri and mode == "direct" and ({"checkpoint-dir", "checkpoint_dir"} & hps.keys()):
        raise ConfigError("pass either --checkpoint-s3-uri or the script's --checkpoint-dir, not both.")
    region = _region(args.region)
    prefix = (args.s3_prefix or f"s3://sagemaker-{region}-{role.group(1)}/igniter-dist").rstrip("/")
    if not prefix.startswith("s3://"):
        raise ConfigError(f"--s3-prefix must start with s3://, got {args.s3_prefix!r}.")
    spec = JobSpec(
        job_name=job_name, image=args.image, role=args.role, region=region,
        instance_type=args.instance_type, instance_count=args.instance_count,
        volume_size_gb=args.volume_size, max_run_s=args.max_run, spot=args.spot, max_wait_s=args.max_wait,
        checkpoint_s3_uri=args.checkpoint_s3_uri, checkpoint_mode=mode, s3_prefix=prefix, program=program,
        hyperparameters=hps, inputs=inputs, environment=parse_pairs(args.env, "--env"),
    )
    return spec, source_dir


def run(args: argparse.Namespace) -> int:
    spec, source_dir = job_spec(args, args.script_args)
    request = build_request(spec)
    if args.dry_run:
        # stdout is the request alone, ready for `aws sagemaker create-training-job --cli-input-json`.
        print(f"dry run: would upload {source_dir.resolve()} to {spec.code_uri} in {spec.region}", file=sys.stderr)
        print(json.dumps(request, indent=2))
        return 0
    arn = send(spec, request, source_dir)
    print(f"created {arn}", flush=True)
    if not args.wait:
        return 0
    try:
        return follow(spec.job_name, spec.region, args.poll)
    except KeyboardInterrupt:
        print("stopped following; the job goes on "
              f"(aws sagemaker stop-training-job --training-job-name {spec.job_name}).")
        return 130
