"""`igniter-dist launch sagemaker`: the request field by field, and a real send to moto's server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import pytest

from igniter_dist import cli
from igniter_dist.errors import ConfigError
from igniter_dist.sagemaker.launcher import SHUTDOWN_TIMEOUT_S, default_job_name, script_hyperparameters
from launch import child_env

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
IMAGE = "123456789012.dkr.ecr.us-west-2.amazonaws.com/igniter-dist:latest"


@pytest.fixture(scope="module")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    return moto_endpoint


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "project"
    (src / "pkg").mkdir(parents=True)
    (src / "train.py").write_text("print('hi')\n")
    (src / "pkg" / "model.py").write_text("X = 1\n")
    for junk in (".git", "__pycache__", ".venv"):
        (src / junk).mkdir()
        (src / junk / "big").write_text("x")
    return src


def launch(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["igniter-dist"])
    code = cli.main(["launch", "sagemaker", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def dry_run(monkeypatch, capsys, *argv: str) -> dict:
    at = argv.index("--") if "--" in argv else len(argv)
    code, out, err = launch(monkeypatch, capsys, *argv[:at], "--dry-run", "true", *argv[at:])
    assert code == 0, err
    return json.loads(out)


def test_dry_run_request_field_by_field(source, monkeypatch, capsys):
    req = dry_run(
        monkeypatch, capsys, str(source / "train.py"),
        "--instance-count", "2", "--instance-type", "ml.g5.12xlarge", "--image", IMAGE, "--role", ROLE,
        "--region", "us-west-2", "--spot", "True", "--max-run", "3600", "--max-wait", "7200",
        "--checkpoint-s3-uri", "s3://bucket/ckpt/digits", "--input", "data=s3://bucket/digits",
        "--job-name", "digits-1", "--env", "MLFLOW_TRACKING_URI=http://mlflow:5000",
        "--", "--max-epochs", "10", "--learning-rate", "0.001", "--resume=true",
    )
    assert req["TrainingJobName"] == "digits-1" and req["RoleArn"] == ROLE
    assert req["ResourceConfig"] == {"InstanceType": "ml.g5.12xlarge", "InstanceCount": 2, "VolumeSizeInGB": 30}
    assert req["AlgorithmSpecification"] == {
        "TrainingImage": IMAGE, "TrainingInputMode": "File",
        "ContainerEntrypoint": ["igniter-dist", "sagemaker-entrypoint"], "ContainerArguments": ["train.py"]}
    # On several instances every rank writes straight to S3, so every node sees every shard.
    assert req["HyperParameters"] == {"max-epochs": "10", "learning-rate": "0.001", "resume": "true",
                                      "sagemaker_program": "train.py", "checkpoint-dir": "s3://bucket/ckpt/digits"}
    assert all(isinstance(v, str) for v in req["HyperParameters"].values())
    assert "CheckpointConfig" not in req
    assert req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    env = req["Environment"]
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) == SHUTDOWN_TIMEOUT_S < 120
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["PYTHONUNBUFFERED"] == "1"
    prefix = "s3://sagemaker-us-west-2-123456789012/igniter-dist"  # the role's account, the SDK's bucket name
    assert req["InputDataConfig"] == [
        {"ChannelName": "code", "InputMode": "File", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": f"{prefix}/digits-1/source/sourcedir.tar.gz",
            "S3DataDistributionType": "FullyReplicated"}}},
        {"ChannelName": "data", "InputMode": "File", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": "s3://bucket/digits", "S3DataDistributionType": "FullyReplicated"}}},
    ]
    assert req["OutputDataConfig"] == {"S3OutputPath": f"{prefix}/output"}


def test_one_instance_syncs_checkpoints_through_sagemaker(source, monkeypatch, capsys):
    # Options may come before SCRIPT too, as with torchrun.
    req = dry_run(monkeypatch, capsys, "--instance-type", "ml.g5.xlarge", "--image", IMAGE, "--role", ROLE,
                  "--region", "eu-west-1", "--spot", "true", "--checkpoint-s3-uri", "s3://b/ckpt",
                  str(source / "train.py"))
    assert req["CheckpointConfig"] == {"S3Uri": "s3://b/ckpt", "LocalPath": "/opt/ml/checkpoints"}
    assert req["HyperParameters"] == {"sagemaker_program": "train.py"}
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400, "MaxWaitTimeInSeconds": 86400}
    assert req["ResourceConfig"]["InstanceCount"] == 1
    assert req["TrainingJobName"].startswith("train-")
    assert "EnableManagedSpotTraining" in req and "MaxWaitTimeInSeconds" in req["StoppingCondition"]


def test_script_in_a_subfolder_of_the_source_dir(source, monkeypatch, capsys):
    (source / "jobs").mkdir()
    (source / "jobs" / "fit.py").write_text("")
    req = dry_run(monkeypatch, capsys, str(source / "jobs" / "fit.py"), "--source-dir", str(source),
                  "--instance-type", "ml.c5.xlarge", "--image", IMAGE, "--role", ROLE, "--region", "us-east-1")
    assert req["HyperParameters"]["sagemaker_program"] == "jobs/fit.py"
    assert req["AlgorithmSpecification"]["ContainerArguments"] == ["jobs/fit.py"]
    assert req["EnableManagedSpotTraining"] is False and "MaxWaitTimeInSeconds" not in req["StoppingCondition"]


@pytest.mark.parametrize("extra, message", [
    (["--image", ""], "--image is required"),
    (["--role", "SageMakerRole"], "--role must be an IAM role ARN"),
    (["--max-wait", "100"], "--max-wait applies to spot jobs only"),
    (["--spot", "true", "--max-run", "600", "--max-wait", "100"], "must be at least --max-run"),
    (["--input", "data=/local/data"], "must be an s3:// URI"),
    (["--input", "code=s3://b/c"], "not 'code'"),
    (["--checkpoint-s3-uri", "/tmp/ckpt"], "must start with s3://"),
    (["--job-name", "bad_name"], "--job-name"),
    (["--", "--flag"], "has no value"),
    (["--", "positional"], "is not a --key value pair"),
    (["--instance-count", "2", "--checkpoint-s3-uri", "s3://b/c", "--", "--checkpoint-dir", "s3://b/d"], "not both"),
])
def test_mistakes_get_one_sentence(source, monkeypatch, capsys, extra, message):
    code, out, err = launch(monkeypatch, capsys, str(source / "train.py"), "--instance-type", "ml.c5.xlarge",
                            "--image", IMAGE, "--role", ROLE, "--region", "us-east-1", "--dry-run", "true", *extra)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1, err


AFTER = " (the script's own arguments go after --)"


@pytest.mark.parametrize("before, after, message", [
    ([], ["--bogus", "1"], "unrecognized arguments: --bogus" + AFTER),
    (["--bogus", "1"], [], "unrecognized arguments: --bogus" + AFTER),
    ([], ["--instance", "2"], "unrecognized arguments: --instance" + AFTER),  # no abbreviations
    ([], ["other.py"], "unrecognized arguments: other.py" + AFTER),
    ([], ["--spot", "maybe"], "argument --spot: expected true or false, got 'maybe'"),
    ([], ["--wait", "maybe", "--poll", "1"], "argument --wait: expected true or false, got 'maybe'"),
    ([], ["--max-run", "0"], "argument --max-run: must be a positive integer, got '0'"),
])
def test_bad_options_are_usage_errors(source, monkeypatch, capsys, before, after, message):
    with pytest.raises(SystemExit) as exit_:
        launch(monkeypatch, capsys, *before, str(source / "train.py"), "--dry-run", "--instance-type", "ml.c5.xlarge",
               "--image", IMAGE, "--role", ROLE, "--region", "us-east-1", *after)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == ""
    assert err.splitlines() == ["usage: igniter-dist launch sagemaker SCRIPT [OPTIONS] [-- SCRIPT_ARGS]",
                                f"igniter-dist launch sagemaker: error: {message}"]


def test_switches_stand_alone_before_or_after_the_script(source, monkeypatch, capsys):
    common = ["--instance-type", "ml.c5.xlarge", "--image", IMAGE, "--role", ROLE, "--region", "us-east-1"]
    code, out, err = launch(monkeypatch, capsys, "--dry-run", "--spot", str(source / "train.py"), *common)
    assert code == 0, err
    request = json.loads(out)
    assert request["EnableManagedSpotTraining"] is True
    assert request["HyperParameters"] == {"sagemaker_program": "train.py"}
    code, out, err = launch(monkeypatch, capsys, str(source / "train.py"), *common, "--spot", "--dry-run",
                            "--", "--max-epochs", "3", "--dry-run", "x")
    assert code == 0, err
    request = json.loads(out)
    assert request["EnableManagedSpotTraining"] is True
    assert request["HyperParameters"] == {"max-epochs": "3", "dry-run": "x", "sagemaker_program": "train.py"}
    code, out, err = launch(monkeypatch, capsys, str(source / "train.py"), *common, "--spot", "false", "--dry-run")
    assert code == 0, err
    assert json.loads(out)["EnableManagedSpotTraining"] is False


def test_help_reads_well():
    def helps(*argv: str) -> str:
        result = subprocess.run([sys.executable, "-m", "igniter_dist.cli", *argv, "--help"], env=child_env(),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        return " ".join(result.stdout.split())  # argparse wraps to the terminal's width

    top = helps()
    assert "launch Launch a training job (on SageMaker)." in top
    assert "igniter-dist COMMAND --help shows a command's options." in top
    assert "sagemaker A SageMaker training job" in helps("launch")
    sm = helps("launch", "sagemaker")
    assert sm.startswith("usage: igniter-dist launch sagemaker SCRIPT [OPTIONS] [-- SCRIPT_ARGS]")
    for shown in ("--instance-count N Instances (nodes) in the job (default: 1).",
                  "--dry-run [{true,false}] Print the request as JSON and send nothing (default: false).",
                  "--wait [{true,false}] Follow the job's status until it ends (default: true).",
                  "--max-run SECONDS Seconds the job may train (default: 86400).",
                  "(default: auto).", "--spot --dry-run -- --max-epochs 10"):
        assert shown in sm, shown
    assert "(default: None)" not in sm and "(default: [])" not in sm


def test_hyperparameter_parsing_and_job_names():
    assert script_hyperparameters(["--a", "1", "--b=x=y", "--c", "-3"]) == {"a": "1", "b": "x=y", "c": "-3"}
    with pytest.raises(ConfigError, match="too long"):
        script_hyperparameters(["--a", "x" * 2501])
    assert default_job_name("my_train.v2.py", now=0) == "my-train-v2-19700101-000000"


def test_send_to_a_real_endpoint_and_read_it_back(aws, source, monkeypatch, capsys):
    import boto3

    boto3.client("s3").create_bucket(Bucket="launch-test",
                                     CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    code, out, err = launch(
        monkeypatch, capsys, str(source / "train.py"), "--instance-count", "2", "--instance-type", "ml.g5.12xlarge",
        "--image", IMAGE, "--role", ROLE, "--spot", "true", "--max-wait", "172800",
        "--checkpoint-s3-uri", "s3://launch-test/ckpt", "--checkpoint-mode", "sync",
        "--input", "data=s3://launch-test/data", "--job-name", "sent-1", "--s3-prefix", "s3://launch-test/jobs/",
        "--poll", "0.05", "--", "--max-epochs", "3")
    assert code == 0, err
    assert "created arn:aws:sagemaker:us-west-2:123456789012:training-job/sent-1" in out
    assert "sent-1: Completed" in out  # moto's jobs complete at once
    job = boto3.client("sagemaker").describe_training_job(TrainingJobName="sent-1")
    assert job["ResourceConfig"] == {"InstanceType": "ml.g5.12xlarge", "InstanceCount": 2, "VolumeSizeInGB": 30}
    assert job["HyperParameters"] == {"max-epochs": "3", "sagemaker_program": "train.py"}
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 86400, "MaxWaitTimeInSeconds": 172800}
    assert job["CheckpointConfig"] == {"S3Uri": "s3://launch-test/ckpt", "LocalPath": "/opt/ml/checkpoints"}
    assert job["AlgorithmSpecification"]["ContainerEntrypoint"] == ["igniter-dist", "sagemaker-entrypoint"]
    assert job["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert job["OutputDataConfig"]["S3OutputPath"] == "s3://launch-test/jobs/output"
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"]}
    assert channels == {"code": "s3://launch-test/jobs/sent-1/source/sourcedir.tar.gz",
                        "data": "s3://launch-test/data"}
    body = boto3.client("s3").get_object(Bucket="launch-test", Key="jobs/sent-1/source/sourcedir.tar.gz")["Body"]
    with tarfile.open(fileobj=io.BytesIO(body.read()), mode="r:gz") as tar:
        names = sorted(tar.getnames())
    assert names == ["pkg", "pkg/model.py", "train.py"]  # no .git, caches or virtualenv


def test_no_wait_returns_after_creating(aws, source, monkeypatch, capsys):
    import boto3

    boto3.client("s3").create_bucket(Bucket="launch-nowait",
                                     CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    code, out, err = launch(monkeypatch, capsys, str(source / "train.py"), "--instance-type", "ml.c5.xlarge",
                            "--image", IMAGE, "--role", ROLE, "--s3-prefix", "s3://launch-nowait/x",
                            "--job-name", "nowait-1", "--wait", "false")
    assert code == 0, err
    assert "created" in out and "Completed" not in out
