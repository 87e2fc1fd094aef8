#!/usr/bin/env bash
# Runs codeclm on every host of a Cloud TPU VM pod slice (one process per host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/jpeg_lm.py:1b gs://bucket/run [--config.x=y ...]
#
# First, here (no TPU needed; the [tpu] extra), it compiles every step for the
# slice's topology (--mode=compile) and stops if one does not fit, so an OOM or
# a bad mesh shows before the pod spends time; SKIP_COMPILE=1 skips that.
# The repo must be checked out at the same path on every worker (and the
# package installed: `pip install -e '.[tpu]'`).
# JAX finds the coordinator itself on TPU pods; the data must be prepared
# first (--mode=prepare, which also runs sharded over the hosts).
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ "${SKIP_COMPILE:-0}" != 1 ]]; then
  topology=$(gcloud compute tpus tpu-vm describe "$tpu" --zone="$zone" \
    --format='value(acceleratorType)')
  (cd "$repo" && python3 -m codeclm.main --config="$config" \
    --workdir="${COMPILE_DIR:-/tmp/codeclm_compile/$tpu}" --mode=compile \
    --config.compile.topology="$topology" "$@")
fi
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd $repo && python3 -m codeclm.main --config=$config --workdir=$workdir \
    --config.distributed.initialize=True $*"
