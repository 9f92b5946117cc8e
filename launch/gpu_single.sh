#!/usr/bin/env bash
# CTRL on one GPU machine (1 or more GPUs, one process): venv, install, fit the reward
# classifier(s), fine-tune. Rerunning the same command resumes (see launch/README.md).
#
#   launch/gpu_single.sh CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   launch/gpu_single.sh configs/aesthetic.py runs/aesthetic \
#       --config.classifier.aesthetic_data=/data/ava_clip_l14.npz
#
# Environment (all optional):
#   VENV=DIR          virtual environment (default: REPO/.venv, git-ignored); created once.
#   PYTHON=python3    interpreter that creates the venv (>= 3.11; checked first, e.g.
#                     `uv python install 3.11` then PYTHON=$(uv python find 3.11)).
#   JAX_CUDA=cuda12   jax extra: cuda12 or cuda13 (must match the machine's NVIDIA driver).
#   XLA_FLAGS=...     appended to the GPU flags set below.
#   STAGES="fit_classifier finetune"   stages to run, in order ("" = install only).
set -euo pipefail

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}
[[ $# -ge 2 ]] || usage
CONFIG=$1
WORKDIR=$2
shift 2
# Relative paths are the caller's: make them absolute before `cd REPO` below.
[[ $CONFIG == /* ]] || CONFIG=$PWD/$CONFIG
[[ $WORKDIR == /* ]] || WORKDIR=$PWD/$WORKDIR

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
PYTHON=${PYTHON:-python3}
JAX_CUDA=${JAX_CUDA:-cuda12}
STAGES=${STAGES-fit_classifier finetune}  # empty: install only

# --- environment: created once; the stamp records what was installed.
STAMP=$VENV/.ctrl_jax_gpu_installed
if [[ ! -f $STAMP ]]; then
  source "$REPO/launch/check_python.sh"
  check_python "$PYTHON" PYTHON || exit 1
  echo "[gpu_single] creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --upgrade pip
  # setup.py pins jax/jaxlib; jax[$JAX_CUDA] must be the same version, so it is read back from
  # the installed package (importlib.metadata: no backend is initialised).
  "$VENV/bin/pip" install -e "$REPO"
  JAX_VERSION=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("jax"))')
  "$VENV/bin/pip" install "jax[$JAX_CUDA]==$JAX_VERSION"
  echo "jax[$JAX_CUDA]==$JAX_VERSION" > "$STAMP"
fi
echo "[gpu_single] $(cat "$STAMP") in $VENV"

# --- XLA on GPU. The latency-hiding scheduler overlaps collectives (gradient all-reduce on
# several GPUs) with compute; harmless on one GPU. Memory: jax preallocates 75% of each GPU by
# default (XLA_PYTHON_CLIENT_MEM_FRACTION to change it).
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

"$VENV/bin/python" - <<'EOF'
import jax
if jax.default_backend() != "gpu":
  raise SystemExit(f"[gpu_single] jax sees no GPU (backend {jax.default_backend()!r}); check "
                   "the NVIDIA driver and JAX_CUDA.")
print(f"[gpu_single] jax {jax.__version__}: {jax.device_count()} x {jax.devices()[0].device_kind}")
EOF

# --- stages. Each is resumable: fit_classifier reuses WORKDIR/classifier once complete,
# finetune restores the latest checkpoint in WORKDIR/finetune/ckpt.
mkdir -p "$WORKDIR"
cd "$REPO"
for stage in $STAGES; do
  echo "[gpu_single] $stage --config=$CONFIG --workdir=$WORKDIR $*" | tee -a "$WORKDIR/launch.log"
  "$VENV/bin/python" -m "ctrl_jax.launch.$stage" --config="$CONFIG" --workdir="$WORKDIR" "$@" \
    2>&1 | tee -a "$WORKDIR/launch.log"
done
