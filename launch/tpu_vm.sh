#!/usr/bin/env bash
# CTRL on a Cloud TPU VM slice (one or many hosts): copy this working tree to every host,
# install jax[tpu] once, then run fit_classifier and finetune on all hosts at once (one
# process per host; CTRL_JAX_DISTRIBUTED=1 makes each call jax.distributed.initialize()).
# Rerunning the same command resumes (see launch/README.md).
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   launch/tpu_vm.sh ctrl-v4-32 us-central2-b configs/aesthetic.py gs://BUCKET/runs/aesthetic
#
# CONFIG is relative to the repository root (e.g. configs/aesthetic.py). On a multi-host
# slice WORKDIR must be gs://... (orbax checkpoints need storage every host sees).
# Environment (all optional):
#   PROJECT=ID        gcloud project (default: gcloud's configured one).
#   REMOTE_DIR=ctrl_jax        repository copy on each host, relative to $HOME.
#   REMOTE_VENV=ctrl_jax_venv  virtual environment on each host, relative to $HOME.
#   REMOTE_PYTHON=python3      interpreter on each host that creates the venv (>= 3.11,
#                     checked first; TPU VM images with 3.10: see launch/README.md).
#   SYNC=1            1: copy the local working tree (tracked + untracked, not ignored) to
#                     every host first; 0: run what is already there.
#   STAGES="fit_classifier finetune"   stages to run, in order.
#   DETACH=0          1: start the stages in the background on every host (nohup; output in
#                     ~/ctrl_jax_run.log there) and return; 0: stream all hosts' output here.
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}
[[ $# -ge 4 ]] || usage
TPU=$1
ZONE=$2
CONFIG=$3
WORKDIR=$4
shift 4

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=${REMOTE_DIR:-ctrl_jax}
REMOTE_VENV=${REMOTE_VENV:-ctrl_jax_venv}
REMOTE_PYTHON=${REMOTE_PYTHON:-python3}
SYNC=${SYNC:-1}
STAGES=${STAGES:-fit_classifier finetune}
DETACH=${DETACH:-0}
GCLOUD_ARGS=(--zone="$ZONE")
[[ -z ${PROJECT:-} ]] || GCLOUD_ARGS+=(--project="$PROJECT")
if [[ $WORKDIR != gs://* ]]; then
  echo "[tpu_vm] warning: WORKDIR=$WORKDIR is not gs://; on a multi-host slice every host" \
       "writes its own local copy and checkpoints cannot be restored." >&2
fi

on_all_hosts() {  # on_all_hosts COMMAND: runs COMMAND with bash on every host of the slice
  gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_ARGS[@]}" --worker=all \
    --command="bash -c $(printf '%q' "$1")"
}

# --- code: the local working tree, as a tarball, to every host.
if [[ $SYNC == 1 ]]; then
  TARBALL=$(mktemp /tmp/ctrl_jax_src.XXXXXX.tgz)
  trap 'rm -f "$TARBALL"' EXIT
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
     | tar czf "$TARBALL" --null --files-from=- --ignore-failed-read)
  echo "[tpu_vm] copying $(du -h "$TARBALL" | cut -f1) of code to every host of $TPU"
  gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU:ctrl_jax_src.tgz" "${GCLOUD_ARGS[@]}" \
    --worker=all
  on_all_hosts "set -euo pipefail; mkdir -p ~/$REMOTE_DIR; tar xzf ~/ctrl_jax_src.tgz -C ~/$REMOTE_DIR"
fi

# --- environment, once per host: the interpreter checked (launch/check_python.sh, its function
# sent along), venv, the package (pins jax), jax[tpu] of the same version (pulls libtpu), gcsfs
# (orbax / etils read and write gs:// through fsspec + gcsfs).
source "$REPO/launch/check_python.sh"
PY=$(printf '%q' "$REMOTE_PYTHON")
on_all_hosts "set -euo pipefail
$(declare -f check_python)
V=~/$REMOTE_VENV
if [[ ! -f \$V/.ctrl_jax_tpu_installed ]]; then
  check_python $PY REMOTE_PYTHON || exit 1
  $PY -m venv \$V || { sudo apt-get update -q \
    && sudo apt-get install -y -q \$(basename $PY)-venv && $PY -m venv \$V; }
  \$V/bin/pip install -q --upgrade pip
  \$V/bin/pip install -q -e ~/$REMOTE_DIR
  JAX_VERSION=\$(\$V/bin/python -c 'import importlib.metadata as m; print(m.version(\"jax\"))')
  \$V/bin/pip install -q \"jax[tpu]==\$JAX_VERSION\" gcsfs
  echo \"jax[tpu]==\$JAX_VERSION\" > \$V/.ctrl_jax_tpu_installed
fi
echo \"[tpu_vm] \$(hostname): \$(cat \$V/.ctrl_jax_tpu_installed)\""

# --- the stages, the same command on every host. Each is resumable: fit_classifier reuses
# WORKDIR/classifier once complete, finetune restores the latest checkpoint.
ARGS=$(printf '%q ' --config="$CONFIG" --workdir="$WORKDIR" "$@")
RUN="set -euo pipefail; cd ~/$REMOTE_DIR; export CTRL_JAX_DISTRIBUTED=1
for stage in $STAGES; do
  echo \"[tpu_vm] \$(hostname) \$stage $ARGS\"
  ~/$REMOTE_VENV/bin/python -m ctrl_jax.launch.\$stage $ARGS
done"
if [[ $DETACH == 1 ]]; then
  on_all_hosts "setsid nohup bash -c $(printf '%q' "$RUN") > ~/ctrl_jax_run.log 2>&1 < /dev/null &"
  echo "[tpu_vm] started on every host; follow with: gcloud compute tpus tpu-vm ssh $TPU" \
       "--zone=$ZONE --worker=0 --command='tail -f ~/ctrl_jax_run.log'"
else
  on_all_hosts "$RUN"
fi
