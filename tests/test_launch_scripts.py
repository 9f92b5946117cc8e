"""The interpreter check of the job scripts (launch/check_python.sh, sourced by gpu_single.sh
and tpu_vm.sh): a Python older than 3.11 stops them with one line saying what to install,
before anything is created, installed or downloaded. Fake interpreters are stub scripts that
print a version; tpu_vm.sh runs against a fake `gcloud` that executes the host command here."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(REPO, "launch", "check_python.sh")


def _stub(folder, name: str, version: str) -> str:
  """An executable that prints `version` whatever it is asked (a fake `python -c …`)."""
  path = os.path.join(folder, name)
  with open(path, "w") as f:
    f.write(f"#!/bin/sh\necho {version}\n")
  os.chmod(path, 0o755)
  return path


def _bash(*args, **env) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                        env={**os.environ, **env})


def _assert_one_line(proc, *parts):
  assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for part in parts:
    assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize("version", ["3.11", "3.12", "3.13", "4.0"])
def test_python_3_11_and_newer_pass(tmp_path, version):
  proc = _bash(CHECK, _stub(tmp_path, "python", version))
  assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_this_interpreter_passes():
  proc = _bash(CHECK, sys.executable)
  assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("version", ["3.10", "3.9", "2.7"])
def test_an_older_python_is_refused_in_one_line_saying_what_to_install(tmp_path, version):
  stub = _stub(tmp_path, "python3", version)
  _assert_one_line(_bash(CHECK, stub), f"PYTHON={stub} is {version}", "uv python install 3.11",
                   "python3.11-venv")
  # $PYTHON is the default interpreter, and the variable named can be another one
  _assert_one_line(_bash(CHECK, PYTHON=stub), f"is {version}")
  _assert_one_line(_bash(CHECK, stub, "REMOTE_PYTHON"), f"REMOTE_PYTHON={stub} is {version}")


def test_a_missing_interpreter_is_refused_in_one_line(tmp_path):
  _assert_one_line(_bash(CHECK, str(tmp_path / "python9")), "no Python interpreter",
                   "uv python install 3.11")


def test_gpu_single_stops_before_creating_the_venv(tmp_path):
  venv = tmp_path / "venv"
  proc = _bash(os.path.join(REPO, "launch", "gpu_single.sh"), "configs/aesthetic.py",
               str(tmp_path / "run"), PYTHON=_stub(tmp_path, "python3", "3.10"), VENV=str(venv))
  _assert_one_line(proc, "is 3.10", "uv python install 3.11", "PYTHON")
  assert proc.stdout == "" and not venv.exists() and not (tmp_path / "run").exists()


def test_tpu_vm_checks_each_host_before_installing(tmp_path):
  """The check runs on the host (the fake gcloud runs the host command in a fake $HOME):
  REMOTE_PYTHON 3.10 stops it before the venv, and no stage runs."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  home.mkdir()
  bin_dir.mkdir()
  log = tmp_path / "gcloud.log"
  gcloud = bin_dir / "gcloud"
  gcloud.write_text("#!/usr/bin/env bash\n"
                    f"echo \"$*\" >> {log}\n"
                    "for a in \"$@\"; do\n"
                    "  case $a in --command=*) exec bash -c \"${a#--command=}\";; esac\n"
                    "done\n")
  gcloud.chmod(0o755)
  stub = _stub(tmp_path, "python3", "3.10")
  proc = _bash(os.path.join(REPO, "launch", "tpu_vm.sh"), "tpu", "zone", "configs/aesthetic.py",
               "gs://bucket/run", SYNC="0", REMOTE_PYTHON=stub, HOME=str(home),
               PATH=f"{bin_dir}:{os.environ['PATH']}")
  _assert_one_line(proc, f"REMOTE_PYTHON={stub} is 3.10", "uv python install 3.11")
  assert not (home / "ctrl_jax_venv").exists()
  assert len(log.read_text().splitlines()) == 1  # the environment step only: no stage ran
