"""`import igniter_dist` stays light: optional integrations are imported only when used."""

import subprocess
import sys


def test_import_pulls_no_optional_integration():
    code = ("import sys, igniter_dist; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'s3fs', 'mlflow', 'sagemaker', 'boto3', 'moto'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
