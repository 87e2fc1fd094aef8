#!/usr/bin/env bash
# Runs codeclm on every host of a Cloud TPU VM pod slice (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/jpeg_lm.py:1b gs://bucket/run [--config.x=y ...]
#
# The repo must be checked out at the same path on every worker (and the
# package installed: `pip install -e .` plus `pip install 'jax[tpu]'`).
# JAX finds the coordinator itself on TPU pods; the data must be prepared
# first (--mode=prepare, which also runs sharded over the hosts).
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd $repo && python3 -m codeclm.main --config=$config --workdir=$workdir \
    --config.distributed.initialize=True $*"
