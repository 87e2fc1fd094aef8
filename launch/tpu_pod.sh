#!/usr/bin/env bash
# The whole run on a Cloud TPU VM pod slice: prepare -> compile check -> train
# -> eval, one process per host, with the workdir on GCS and the data on a
# gcsfuse mount.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/jpeg_lm.py:1b gs://bucket/run \
#       /mnt/bucket/data [--config.x=y ...]
#
# Each --config.x=y reaches codeclm.main on every worker exactly as this
# script received it (quote it for your own shell as usual, e.g.
# --config.mesh.shape='(1,-1,1,1)'): every word of the workers' command line is
# quoted with printf %q for the worker's login shell (bash on TPU VMs).
#
# The workdir (checkpoints, events, samples, eval) may be gs://. The data dir
# must be a local path on every worker: the ArrayRecord library cannot read
# gs:// (google/array_record#120), so mount the bucket on each worker first:
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \
#     --command='mkdir -p /mnt/bucket && gcsfuse --implicit-dirs bucket /mnt/bucket'
#
# Same code, same Python on every worker: the repo must be checked out at this
# script's repo path (REPO overrides it) on every worker, and PYTHON (default
# python3, as the workers' ssh login finds it on PATH) must name an
# interpreter that has the package installed (`pip install -e '.[tpu]'`) on
# every worker; a venv at one path on all of them is simplest:
#   PYTHON=/opt/venv/bin/python launch/tpu_pod.sh ...
# A pre-flight checks this on every worker (and PYTHON here, for the compile
# check) before any stage, and stops naming each worker (its host name, which
# ends in -w-<index>) that lacks the repo path or cannot `import codeclm, jax`.
#
# JAX finds the coordinator itself on TPU pods (the TPU metadata server).
# STEPS picks the stages (default: all four); the compile check runs here (no
# TPU needed; the [tpu] extra; its workdir is COMPILE_DIR) and stops the
# script if a step does not fit, before the pod spends time. Eval is one
# jax.distributed job over every host, like training (so a model sharded over
# hosts can be scored): process i samples and writes slice i of the
# references, process 0 merges into <workdir>/eval/step_<step>/results.json.
set -euo pipefail
if (( $# < 5 )); then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR DATA_DIR [--config.x=y ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4 data_dir=$5
shift 5
repo=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
python=${PYTHON:-python3}
steps=${STEPS:-prepare compile train eval}
flags=(--config="$config" --workdir="$workdir" --config.data.dir="$data_dir"
       "$@")

quoted() {  # quoted WORD...: one line the workers' shell splits into WORDs.
  local line
  printf -v line '%q ' "$@"
  printf '%s' "${line% }"
}

on_workers() {  # on_workers WORD...: run WORDs in the repo on every worker.
  gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
    --command="cd $(quoted "$repo") && $(quoted "$@")"
}

# Pre-flight: the repo path and PYTHON on every worker (and here, if the
# compile check runs), before any stage.
# shellcheck disable=SC2016  # Expanded by bash on each worker.
check='w="worker ${HOSTNAME:-$(hostname)}"; if ! cd -- "$1" 2>/dev/null; then echo "codeclm pre-flight failed on $w: no directory $1 (the repo must be checked out at the same path on every worker)" >&2; exit 1; fi; if ! out=$("$2" -c "import codeclm, jax" 2>&1); then echo "codeclm pre-flight failed on $w: $2 cannot import codeclm and jax in $1 (set PYTHON to an interpreter that has them, at the same path on every worker): $(printf %s "$out" | tail -n 1)" >&2; exit 1; fi'
if ! gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
    --command="$(quoted bash -c "$check" codeclm-preflight "$repo" \
                 "$python")"; then
  echo "$0: pre-flight failed (see the workers named above); no stage ran." >&2
  exit 1
fi
if [[ " $steps " == *" compile "* ]] && ! (
    cd "$repo" && "$python" -c "import codeclm, jax"); then
  echo "$0: pre-flight failed here: $python cannot import codeclm and jax in" \
       "$repo (needed for the compile check); no stage ran." >&2
  exit 1
fi

if [[ " $steps " == *" prepare "* ]]; then
  on_workers "$python" -m codeclm.main "${flags[@]}" --mode=prepare \
    --config.distributed.initialize=True
fi
if [[ " $steps " == *" compile "* ]]; then
  topology=$(gcloud compute tpus tpu-vm describe "$tpu" --zone="$zone" \
    --format='value(acceleratorType)')
  (cd "$repo" && "$python" -m codeclm.main --config="$config" \
    --workdir="${COMPILE_DIR:-/tmp/codeclm_compile/$tpu}" --mode=compile \
    --config.compile.topology="$topology" "$@")
fi
if [[ " $steps " == *" train "* ]]; then
  on_workers "$python" -m codeclm.main "${flags[@]}" \
    --config.distributed.initialize=True
fi
if [[ " $steps " == *" eval "* ]]; then
  on_workers "$python" -m codeclm.main "${flags[@]}" --mode=eval \
    --config.distributed.initialize=True
fi
