"""The launchers under bad input, concurrent runs and preemption: one-line errors before any
work (no traceback), a workdir lock, SIGTERM → checkpoint → resume to the uninterrupted result,
and a --help that documents the flags, config overrides and environment variables."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ctrl_jax import experiment
from ctrl_jax.problems import base
from ctrl_jax.runtime import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import smoke  # noqa: E402  pylint: disable=g-import-not-at-top

SMOKE = f"--config={REPO}/configs/smoke.py"
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")


def _launch(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", f"ctrl_jax.launch.{module}", *args], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(out, *expected):
  assert out.returncode == 1, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, lines
  for text in expected:
    assert text in lines[0], lines[0]


@pytest.mark.parametrize("override,expected", [
    ("--config.eta=3.0", "config.eta=3.0: expected a DDIM η in [0, 1]"),
    ("--config.guidance_scale=-7.5", "config.guidance_scale=-7.5"),
    ("--config.remat_policy=nothing_savable", "config.remat_policy='nothing_savable'"),
    ("--config.log_every=0", "config.log_every=0"),
    ("--config.num_updates=0", "config.num_updates=0"),
    ("--config.lr_schedul=cosine", "'lr_schedul', which is not a field of the config"),
    ("--config.num_updates=abc", "--config.num_updates=abc"),
    ("--config.kl_convention=offical", "config.kl_convention='offical'"),
    ("--config.truncation=randm", "config.truncation='randm'"),
])
def test_bad_config_values_fail_in_one_line_before_any_work(tmp_path, override, expected):
  workdir = tmp_path / "run"
  out = _launch("finetune", SMOKE, f"--workdir={workdir}", override)
  _assert_one_line_error(out, expected)
  # nothing trained, nothing logged (flag errors stop before the workdir is even created)
  assert not os.path.exists(workdir) or sorted(os.listdir(workdir)) == [".lock"]


def test_a_typo_in_eval_method_fails_before_pre_training(tmp_path):
  out = _launch("finetune", f"--config={REPO}/configs/digits.py:quick",
                f"--workdir={tmp_path / 'run'}", "--config.eval.method=dpss")
  _assert_one_line_error(out, "config.eval.method='dpss'", "'dps'")
  assert not os.path.exists(tmp_path / "run" / "pretrain")


def test_bad_workdirs_are_named(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("precious")
  _assert_one_line_error(_launch("finetune", SMOKE, f"--workdir={a_file}"), "is a file")
  _assert_one_line_error(_launch("finetune", SMOKE, f"--workdir={a_file}/sub"),
                         "cannot be created")
  assert a_file.read_text() == "precious"


def test_help_lists_flags_config_overrides_and_environment():
  out = _launch("finetune", "--help")
  text = out.stdout + out.stderr
  for needle in ("--config", "--workdir", "Config overrides", "--config.FIELD=VALUE",
                 "CTRL_JAX_COMPILE_CACHE", "CTRL_JAX_HUGEPAGES", "CTRL_JAX_DISTRIBUTED",
                 "Exit status"):
    assert needle in text, needle
  assert "--overwrite" in (_launch("export", "--help").stdout + _launch("export", "--help").stderr)


def test_a_second_run_on_a_locked_workdir_fails_at_once_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom ctrl_jax.runtime import workdir\n"
       "workdir.Lock(sys.argv[1]).__enter__()\nprint('locked', flush=True)\ntime.sleep(120)",
       workdir], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.time()
    out = _launch("finetune", SMOKE, f"--workdir={workdir}")
    _assert_one_line_error(out, "is in use by another run", f"pid {holder.pid}")
    assert time.time() - t0 < 60  # at once, not after an orbax time-out
  finally:
    holder.kill()  # like kill -9: the OS releases the lock
    holder.wait()
  with workdir_lib.Lock(workdir):  # free again
    pass


def _final_params(workdir, config):
  problem = base.get("tiny").build(config, workdir)
  params, step = experiment.load_finetuned(config, workdir, problem)
  return jax.device_get(params), step


def test_sigterm_saves_a_checkpoint_and_the_rerun_ends_where_an_uninterrupted_run_ends(
    tmp_path):
  args = [SMOKE, "--config.num_updates=24", "--config.checkpoint_every=100",
          "--config.log_every=1"]
  straight = _launch("finetune", *args, f"--workdir={tmp_path / 'straight'}")
  assert straight.returncode == 0, straight.stderr[-3000:]

  workdir = tmp_path / "preempted"
  proc = subprocess.Popen([sys.executable, "-m", "ctrl_jax.launch.finetune", *args,
                           f"--workdir={workdir}"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith("[finetune] 3/24"):
      proc.send_signal(signal.SIGTERM)
      break
  rest, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM: stopped after update" in rest
  saved = sorted(int(d) for d in os.listdir(workdir / "finetune" / "ckpt") if d.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < 24  # checkpoint_every=100: only the preemption's

  resumed = _launch("finetune", *args, f"--workdir={workdir}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from {workdir}/finetune/ckpt/{saved[0]}" in resumed.stdout

  config = smoke.get_config()
  config.num_updates = 24
  a, step_a = _final_params(str(tmp_path / "straight"), config)
  b, step_b = _final_params(str(workdir), config)
  assert step_a == step_b == 24
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  rows = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(d / "finetune.jsonl"))}  # noqa: E731
  ra, rb = rows(tmp_path / "straight"), rows(workdir)
  assert set(rb) <= set(ra) and all(ra[s] == rb[s] for s in rb)
