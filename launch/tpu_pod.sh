#!/usr/bin/env bash
# The whole run on a Cloud TPU VM pod slice: prepare -> compile check -> train
# -> eval, one process per host, with the workdir on GCS and the data on a
# gcsfuse mount.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/jpeg_lm.py:1b gs://bucket/run \
#       /mnt/bucket/data [--config.x=y ...]
#
# The workdir (checkpoints, events, samples, eval) may be gs://. The data dir
# must be a local path on every worker: the ArrayRecord library cannot read
# gs:// (google/array_record#120), so mount the bucket on each worker first:
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \
#     --command='mkdir -p /mnt/bucket && gcsfuse --implicit-dirs bucket /mnt/bucket'
# The repo must be checked out at the same path on every worker (and the
# package installed: `pip install -e '.[tpu]'`). JAX finds the coordinator
# itself on TPU pods. STEPS picks the stages (default: all four); the compile
# check runs here (no TPU needed; the [tpu] extra) and stops the script if a
# step does not fit, before the pod spends time. Eval is one jax.distributed
# job over every host, like training (so a model sharded over hosts can be
# scored): process i samples and writes slice i of the references, process 0
# merges into <workdir>/eval/step_<step>/results.json.
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4 data_dir=$5
shift 5
repo=$(cd "$(dirname "$0")/.." && pwd)
steps=${STEPS:-prepare compile train eval}
flags="--config=$config --workdir=$workdir --config.data.dir=$data_dir $*"

on_workers() {  # on_workers WORKER MODE_FLAGS: codeclm.main on those hosts.
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker="$1" \
    --command="cd $repo && python3 -m codeclm.main $flags $2"
}

if [[ " $steps " == *" prepare "* ]]; then
  on_workers all "--mode=prepare --config.distributed.initialize=True"
fi
if [[ " $steps " == *" compile "* ]]; then
  topology=$(gcloud compute tpus tpu-vm describe "$tpu" --zone="$zone" \
    --format='value(acceleratorType)')
  (cd "$repo" && python3 -m codeclm.main --config="$config" \
    --workdir="${COMPILE_DIR:-/tmp/codeclm_compile/$tpu}" --mode=compile \
    --config.compile.topology="$topology" "$@")
fi
if [[ " $steps " == *" train "* ]]; then
  on_workers all "--config.distributed.initialize=True"
fi
if [[ " $steps " == *" eval "* ]]; then
  on_workers all "--mode=eval --config.distributed.initialize=True"
fi
