#!/usr/bin/env bash
# Whether an interpreter is Python >= 3.11 (setup.py's python_requires). Sourced by
# gpu_single.sh and tpu_vm.sh (the function `check_python`; tpu_vm.sh sends it to every host,
# after uv's Python 3.11 where REMOTE_PYTHON is older), or run on its own:
#
#   launch/check_python.sh [PYTHON [VARIABLE]]
#
# PYTHON defaults to $PYTHON, else python3; VARIABLE (default PYTHON) is the environment
# variable the message tells you to set. Exit 0 when it is new enough; otherwise one line on
# stderr saying what to install, and exit 1. Runs nothing but the interpreter.

check_python() {  # check_python [PYTHON [VARIABLE]]
  local python=${1:-${PYTHON:-python3}} variable=${2:-PYTHON} version major minor
  local install="install Python >= 3.11 (\`uv python install 3.11\`, then"
  install+=" $variable=\$(uv python find 3.11); or the distribution's python3.11 and"
  install+=" python3.11-venv, e.g. from the deadsnakes PPA on Ubuntu 22.04 and TPU VM images)"
  if ! version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
  then
    echo "error: no Python interpreter '$python' ($variable); $install." >&2
    return 1
  fi
  major=${version%%.*}
  minor=${version#*.}
  if ! [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] \
      || (( major < 3 || (major == 3 && minor < 11) )); then
    echo "error: ctrl_jax needs Python >= 3.11 and $variable=$python is $version; $install" \
         "and rerun with $variable set to it." >&2
    return 1
  fi
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  check_python "$@"
fi
