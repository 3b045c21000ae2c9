#!/usr/bin/env bash
# Create benchmarks/.venv: CPU torch, igniter-dist (editable) and the peers of requirements.txt.
# Independent of the Makefile; run from anywhere: bash benchmarks/setup_env.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
venv="$here/.venv"
py="$venv/bin/python"

python3 -m venv "$venv"
# Every install is constrained to the CPU torch, so no peer can pull a multi-GB CUDA build.
pin="$venv/torch-pin.txt"
echo "torch==2.13.0" > "$pin"
pip_install() { "$py" -m pip install --quiet --constraint "$pin" "$@"; }

pip_install torch==2.13.0
pip_install -c "$root/constraints.txt" -e "$root"
pip_install -c "$root/constraints.txt" -r "$here/requirements.txt"
pip_install py-spy==0.4.3  # sampling profiler, to explain a missed target

"$py" - <<'PY'
import torch
assert torch.__version__ == "2.13.0+cpu", f"benchmarks/.venv got torch {torch.__version__}, expected 2.13.0+cpu"
import accelerate, ignite, lightning
print(f"benchmarks/.venv ready: torch {torch.__version__}, lightning {lightning.__version__}, "
      f"ignite {ignite.__version__}, accelerate {accelerate.__version__}")
PY
