#!/usr/bin/env bash
# Multi-node torchrun over SSH: one torchrun agent per host, static rendezvous on the first host.
#
#   HOSTS="gpu1 gpu2" launch/torchrun-multinode/run.sh examples/digits/train.py \
#       --checkpoint-dir s3://bucket/runs/digits --max-epochs 10
#
# Every host needs the same code at WORKDIR and the same Python environment. Checkpoints must
# go to storage every host sees (s3:// or a shared filesystem). Ctrl-C here hangs up every
# remote session (ssh -tt), so each torchrun gets SIGHUP, forwards it, and the ranks save.
#
# Settings (environment):
#   HOSTS           hosts, space-separated; the first is the rendezvous master (required)
#   NPROC_PER_NODE  processes per host (default: gpu = one per GPU)
#   MASTER_PORT     rendezvous port on the first host (default: 29500)
#   MASTER_ADDR     address of the first host as the others reach it (default: its name)
#   WORKDIR         folder on every host to run in (default: this folder)
#   PYTHON          interpreter on every host (default: python)
#   SSH             ssh command (default: ssh)
set -euo pipefail

read -r -a hosts <<< "${HOSTS:?set HOSTS to the space-separated hosts, the first one being the master}"
script=${1:?usage: HOSTS=\"h1 h2\" $0 SCRIPT [ARGS...]}
shift
master=${MASTER_ADDR:-${hosts[0]}}
port=${MASTER_PORT:-29500}
nproc=${NPROC_PER_NODE:-gpu}
workdir=${WORKDIR:-$PWD}
python=${PYTHON:-python}
read -r -a ssh <<< "${SSH:-ssh}"

pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM

for i in "${!hosts[@]}"; do
    host=${hosts[$i]}
    remote="cd $(printf '%q' "$workdir") && exec $python -m torch.distributed.run \
--nnodes=${#hosts[@]} --node-rank=$i --nproc-per-node=$nproc \
--master-addr=$master --master-port=$port $(printf '%q ' "$script" "$@")"
    # Prefix each host's lines; $! stays the ssh process so the trap reaches it.
    "${ssh[@]}" -tt "$host" "$remote" > >(sed -u "s/^/[$host] /") 2>&1 < /dev/null &
    pids+=("$!")
done

status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
exit "$status"
