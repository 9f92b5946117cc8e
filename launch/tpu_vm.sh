#!/usr/bin/env bash
# CTRL on a Cloud TPU VM slice (one or many hosts): copy this working tree to every host,
# install Python 3.11 (if needed) and jax[tpu] once, then run fit_classifier and finetune on all
# hosts at once (one process per host; CTRL_JAX_DISTRIBUTED=1 makes each call
# jax.distributed.initialize()). Rerunning the same command resumes (see launch/README.md).
#
#   launch/tpu_vm.sh [--dry_run] TPU_NAME ZONE CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   launch/tpu_vm.sh ctrl-v4-32 us-central2-b configs/aesthetic.py gs://BUCKET/runs/aesthetic
#
# CONFIG is relative to the repository root (e.g. configs/aesthetic.py). On a multi-host
# slice WORKDIR must be gs://... (orbax checkpoints need storage every host sees).
# --dry_run (anywhere on the line): print every gcloud command, shell-quoted, one per line,
# with the command each host runs and the environment of each process; execute nothing.
# Environment (all optional):
#   PROJECT=ID        gcloud project (default: gcloud's configured one).
#   REMOTE_DIR=ctrl_jax        repository copy on each host, relative to $HOME.
#   REMOTE_VENV=ctrl_jax_venv  virtual environment on each host, relative to $HOME.
#   REMOTE_PYTHON=python3      interpreter on each host that creates the venv; older than 3.11
#                     or missing (TPU VM images: 3.10): uv installs 3.11 on that host.
#   SYNC=1            1: copy the local working tree (tracked + untracked, not ignored) to
#                     every host first; 0: run what is already there.
#   WEIGHTS_FROM="gs://B/sd15 ..."  before the stages, rsync each to ~/weights/NAME on every
#                     host (NAME: its last path element; WEIGHTS_DIR=weights, relative to $HOME);
#                     then pass e.g. --config.pretrained_model=/home/$USER/weights/sd15.
#   STAGES="fit_classifier finetune"   stages to run, in order (modules of ctrl_jax.launch).
#   DETACH=0          1: start the stages in the background on every host (nohup; output in
#                     ~/ctrl_jax_run.log there) and return; 0: stream all hosts' output here.
#   NUM_WORKERS=N or ACCELERATOR_TYPE=v5litepod-16   hosts of the slice, for --dry_run's
#                     per-process listing (v4-C, v5p-C: C/2 chips; v5e-N, v5litepod-N, v6e-N:
#                     N chips, one host up to 8; 4 chips per host otherwise).
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}
die() { echo "error: $*" >&2; exit 1; }

DRY_RUN=0
ARGV=()
for arg in "$@"; do
  if [[ $arg == --dry_run ]]; then DRY_RUN=1; else ARGV+=("$arg"); fi
done
set -- ${ARGV[@]+"${ARGV[@]}"}
[[ $# -ge 4 ]] || usage
for arg in "$1" "$2" "$3" "$4"; do
  [[ $arg != -* ]] || die "'$arg' where TPU_NAME ZONE CONFIG WORKDIR are expected (flags go after them)."
done
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
WEIGHTS_FROM=${WEIGHTS_FROM:-}
WEIGHTS_DIR=${WEIGHTS_DIR:-weights}
GCLOUD_ARGS=(--zone="$ZONE")
[[ -z ${PROJECT:-} ]] || GCLOUD_ARGS+=(--project="$PROJECT")
for stage in $STAGES; do
  [[ $stage =~ ^[a-z_]+$ && -f $REPO/ctrl_jax/launch/$stage.py ]] \
    || die "STAGES: '$stage' is not a module of ctrl_jax/launch (e.g. fit_classifier finetune)."
done
for src in $WEIGHTS_FROM; do
  [[ $src == gs://?*/?* ]] || die "WEIGHTS_FROM: '$src' is not gs://BUCKET/PATH."
done
if [[ $WORKDIR != gs://* ]]; then
  echo "[tpu_vm] warning: WORKDIR=$WORKDIR is not gs://; on a multi-host slice every host" \
       "writes its own local copy and checkpoints cannot be restored." >&2
fi

hosts_of() {  # hosts_of ACCELERATOR_TYPE: the number of TPU VM hosts of that slice type
  local family=${1%-*} size=${1##*-} chips
  [[ $1 == *-* && $size =~ ^[1-9][0-9]*$ ]] || return 1
  case $family in
    v4|v5p) chips=$((size / 2));;  # the size counts TensorCores, two per chip
    v5e|v5litepod|v6e) chips=$size; (( size > 8 )) || chips=4;;  # up to 8 chips: one host
    *) return 1;;
  esac
  echo $(( (chips + 3) / 4 ))
}
NUM_HOSTS=
if [[ -n ${NUM_WORKERS:-} ]]; then
  [[ $NUM_WORKERS =~ ^[1-9][0-9]*$ ]] || die "NUM_WORKERS=$NUM_WORKERS is not a positive integer."
  NUM_HOSTS=$NUM_WORKERS
elif [[ -n ${ACCELERATOR_TYPE:-} ]]; then
  NUM_HOSTS=$(hosts_of "$ACCELERATOR_TYPE") || die "ACCELERATOR_TYPE=$ACCELERATOR_TYPE is not" \
    "v4-C, v5p-C, v5e-N, v5litepod-N or v6e-N; set NUM_WORKERS (hosts of the slice) instead."
fi

quoted() {  # quoted WORD...: the words as one shell-quoted line
  local line="" word
  for word in "$@"; do line+="${line:+ }$(printf '%q' "$word")"; done
  echo "$line"
}
gcloud_() {  # gcloud_ ARGS...: runs gcloud, or with --dry_run prints it
  if [[ $DRY_RUN == 1 ]]; then quoted gcloud "$@"; else gcloud "$@"; fi
}
note() {  # note TEXT: a comment line of the dry run (nothing otherwise)
  [[ $DRY_RUN == 0 ]] || echo "# $*"
}
on_all_hosts() {  # on_all_hosts SCRIPT: runs SCRIPT with bash on every host of the slice
  gcloud_ compute tpus tpu-vm ssh "$TPU" "${GCLOUD_ARGS[@]}" --worker=all \
    --command="bash -c $(printf '%q' "$1")"
  if [[ $DRY_RUN == 1 ]]; then
    local line
    while IFS= read -r line; do echo "#   | $line"; done <<< "$1"
  fi
}
note "launch/tpu_vm.sh --dry_run: the commands it would run, in order; nothing is executed."

# --- code: the local working tree, as a tarball, to every host.
if [[ $SYNC == 1 ]]; then
  if [[ $DRY_RUN == 1 ]]; then
    TARBALL=${TMPDIR:-/tmp}/ctrl_jax_src.tgz
  else
    TARBALL=$(mktemp "${TMPDIR:-/tmp}/ctrl_jax_src.XXXXXX.tgz")
    trap 'rm -f "$TARBALL"' EXIT
  fi
  TAR_CMD="git ls-files -z --cached --others --exclude-standard | tar czf $(printf '%q' "$TARBALL")"
  TAR_CMD+=" --null --files-from=- --ignore-failed-read"
  if [[ $DRY_RUN == 1 ]]; then
    note "code: the working tree as a tarball, copied to and unpacked on every host"
    note "local: (cd $(printf '%q' "$REPO") && $TAR_CMD)"
  else
    (cd "$REPO" && eval "$TAR_CMD")
    echo "[tpu_vm] copying $(du -h "$TARBALL" | cut -f1) of code to every host of $TPU"
  fi
  gcloud_ compute tpus tpu-vm scp "$TARBALL" "$TPU:ctrl_jax_src.tgz" "${GCLOUD_ARGS[@]}" \
    --worker=all
  RD="~/$(printf '%q' "$REMOTE_DIR")"
  on_all_hosts "set -euo pipefail; mkdir -p $RD; tar xzf ~/ctrl_jax_src.tgz -C $RD"
fi

# --- environment, once per host (marker file): Python >= 3.11 (REMOTE_PYTHON, else one that uv
# installs), checked by launch/check_python.sh's function (sent along); the venv, the package
# (pins jax), jax[tpu] of the same version (pulls libtpu), gcsfs (orbax / etils read and write
# gs:// through fsspec + gcsfs).
source "$REPO/launch/check_python.sh"
read -r -d '' INSTALL <<'EOF' || true
if [[ ! -f $V/.ctrl_jax_tpu_installed ]]; then
  if ! check_python "$PY" REMOTE_PYTHON 2>/dev/null; then
    echo "[tpu_vm] $(hostname): $PY is not Python >= 3.11; installing Python 3.11 with uv" \
         "(log: ~/ctrl_jax_uv.log)"
    export PATH=~/.local/bin:~/.cargo/bin:$PATH
    if ! command -v uv > /dev/null; then
      { curl -LsSf https://astral.sh/uv/install.sh | UV_NO_MODIFY_PATH=1 sh; } \
          >> ~/ctrl_jax_uv.log 2>&1 \
        || python3 -m pip install --user uv >> ~/ctrl_jax_uv.log 2>&1 || true
      command -v uv > /dev/null || { echo "error: $(hostname): could not install uv (curl" \
        "https://astral.sh/uv/install.sh | sh, then python3 -m pip install --user uv; see" \
        "~/ctrl_jax_uv.log); install Python >= 3.11 there and set REMOTE_PYTHON." >&2; exit 1; }
    fi
    uv python install 3.11 >> ~/ctrl_jax_uv.log 2>&1 || { echo "error: $(hostname): uv python" \
      "install 3.11 failed (see ~/ctrl_jax_uv.log); install Python >= 3.11 there and set" \
      "REMOTE_PYTHON." >&2; exit 1; }
    PY=$(uv python find 3.11 2>> ~/ctrl_jax_uv.log) || PY="uv python find 3.11"
  fi
  check_python "$PY" REMOTE_PYTHON || exit 1
  "$PY" -m venv "$V" || { sudo apt-get update -q \
    && sudo apt-get install -y -q "$(basename "$PY")-venv" && "$PY" -m venv "$V"; }
  "$V/bin/pip" install -q --upgrade pip
  "$V/bin/pip" install -q -e "$SRC"
  JAX_VERSION=$("$V/bin/python" -c 'import importlib.metadata as m; print(m.version("jax"))')
  "$V/bin/pip" install -q "jax[tpu]==$JAX_VERSION" gcsfs
  echo "jax[tpu]==$JAX_VERSION $("$V/bin/python" -c 'import sys; print("python %d.%d" % sys.version_info[:2])')" \
    > "$V/.ctrl_jax_tpu_installed"
fi
echo "[tpu_vm] $(hostname): $(cat "$V/.ctrl_jax_tpu_installed")"
EOF
note "environment, once per host: Python >= 3.11 (uv if REMOTE_PYTHON is older), venv, jax[tpu]"
on_all_hosts "set -euo pipefail
$(declare -f check_python)
PY=$(printf '%q' "$REMOTE_PYTHON")
V=~/$(printf '%q' "$REMOTE_VENV")
SRC=~/$(printf '%q' "$REMOTE_DIR")
$INSTALL"

# --- weights from a bucket, to a local folder on every host (incremental).
if [[ -n $WEIGHTS_FROM ]]; then
  WEIGHTS="set -euo pipefail"
  for src in $WEIGHTS_FROM; do
    src=${src%/}
    dst="~/$(printf '%q' "$WEIGHTS_DIR/${src##*/}")"
    WEIGHTS+=$'\n'"mkdir -p $dst && gsutil -m -q rsync -r $(printf '%q' "$src") $dst"
    WEIGHTS+=$'\n'"echo \"[tpu_vm] \$(hostname): $dst\""
  done
  note "weights: the bucket folders to ~/$WEIGHTS_DIR on every host"
  on_all_hosts "$WEIGHTS"
fi

# --- the stages, the same command on every host. Each is resumable: fit_classifier reuses
# WORKDIR/classifier once complete, finetune restores the latest checkpoint.
ARGS=$(quoted --config="$CONFIG" --workdir="$WORKDIR" "$@")
RUN="set -euo pipefail; cd ~/$(printf '%q' "$REMOTE_DIR"); export CTRL_JAX_DISTRIBUTED=1"
for stage in $STAGES; do
  RUN+=$'\n'"echo \"[tpu_vm] \$(hostname) $stage\""
  RUN+=$'\n'"~/$(printf '%q' "$REMOTE_VENV")/bin/python -m ctrl_jax.launch.$stage $ARGS"
done
note "stages: $STAGES, one process per host, each with CTRL_JAX_DISTRIBUTED=1 only:"
note "jax.distributed.initialize() reads the coordinator (worker 0), the number of processes"
note "and each process id (its worker index) from the TPU VM metadata."
if [[ -n $NUM_HOSTS ]]; then
  for ((worker = 0; worker < NUM_HOSTS; worker++)); do
    note "worker $worker: CTRL_JAX_DISTRIBUTED=1 (process_id $worker of $NUM_HOSTS," \
         "coordinator: worker 0, from TPU metadata)"
  done
else
  note "(NUM_WORKERS or ACCELERATOR_TYPE lists the processes: worker i is process_id i)"
fi
if [[ $DETACH == 1 ]]; then
  on_all_hosts "setsid nohup bash -c $(printf '%q' "$RUN") > ~/ctrl_jax_run.log 2>&1 < /dev/null &"
  FOLLOW=$(quoted gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_ARGS[@]}" --worker=0 \
           --command='tail -f ~/ctrl_jax_run.log')
  if [[ $DRY_RUN == 1 ]]; then
    note "then follow with: $FOLLOW"
  else
    echo "[tpu_vm] started on every host; follow with: $FOLLOW"
  fi
else
  on_all_hosts "$RUN"
fi
