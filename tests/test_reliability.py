"""The launchers under bad input, concurrent runs and preemption: one-line errors before any
work (no traceback), a workdir lock, SIGTERM → checkpoint → resume to the uninterrupted result,
and a --help that documents the flags, config overrides and environment variables."""
import json
import os
import re
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
    ("--config.remat_policy=nothing_savable", "config.remat_policy='nothing_savable'"),
    ("--config.lr_schedul=cosine", "'lr_schedul', which is not a field of the config"),
    ("--config.num_updates=abc", "--config.num_updates=abc"),
])
def test_bad_config_values_fail_in_one_line_before_any_work(tmp_path, override, expected):
  """The CLI form: exit 1, one line naming the field, no traceback, nothing written (a bad
  value is caught by validation, a missing field or a bad type while parsing the flags)."""
  workdir = tmp_path / "run"
  out = _launch("finetune", SMOKE, f"--workdir={workdir}", override)
  _assert_one_line_error(out, expected)
  # nothing trained, nothing logged (flag errors stop before the workdir is even created)
  assert not os.path.exists(workdir) or sorted(os.listdir(workdir)) == [".lock"]


@pytest.mark.parametrize("field,value,expected", [
    ("eta", 3.0, "a DDIM η in [0, 1]"),
    ("guidance_scale", -7.5, "a CFG scale ≥ 0"),
    ("gamma", float("nan"), "a reward weight γ ≥ 0"),
    ("remat_policy", "nothing_savable", "'' (off) or one of"),
    ("log_every", 0, "an integer ≥ 1"),
    ("num_updates", 0, "an integer ≥ 1"),
    ("kl_convention", "offical", "one of ('official', 'exact')"),
    ("truncation", "randm", "one of ('none', 'random', 'last_k')"),
    ("truncation_k", 7, "an integer in [1, num_inference_steps]"),
    ("lr_lora", -1e-3, "a number ≥ 0"),
    ("grad_clip_norm", 0.0, "a number > 0"),
    ("lora_rank", -1, "an integer ≥ 0"),
    ("problem", "tiny2", "one of ['digits', 'sd', 'tiny']"),
])
def test_validation_names_the_field_its_value_and_what_is_expected(field, value, expected):
  config = smoke.get_config()
  config[field] = value
  with pytest.raises(ValueError) as e:
    experiment.validate_config(config)
  assert str(e.value).startswith(f"config.{field}={value!r}: expected {expected}")


@pytest.mark.parametrize("config_file,field,value,expected", [
    ("digits.py", "task", "inks", "config.task='inks'"),
    ("digits.py", "classifier.num_labels", 5000, "config.classifier.num_labels=5000"),
    ("digits.py", "eval.grid_samples", 99, "config.eval.grid_samples=99"),
    ("aesthetic.py", "pretrained_model", "/no/such/sd15", "is not a folder"),
    ("aesthetic.py", "classifier.laion_weights", "/no/such.pth", "is not a file"),
    ("compressibility.py", "classifier.compress_data", "/no/images", "does not exist"),
    ("compressibility.py", "classifier.cnn_arch", "resize",
     "config.classifier.cnn_arch='resize'; expected one of ('official', 'resized')"),
    ("compressibility.py", "activation_dtype", "float16", "config.activation_dtype='float16'"),
])
def test_problem_fields_and_paths_are_validated_before_any_work(config_file, field, value,
                                                                expected):
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(config_file[:-3]).get_config()
  if config.problem == "sd":
    config.pretrained_model = os.path.join(REPO, "configs")  # an existing folder
    config.classifier.laion_weights = os.path.join(REPO, "setup.py")  # an existing file
  *parents, leaf = field.split(".")
  target = config
  for part in parents:
    target = target[part]
  target[leaf] = value
  with pytest.raises((ValueError, FileNotFoundError), match=re.escape(expected)):
    experiment.validate_config(config)


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
  export_help = _launch("export", "--help")
  assert "--overwrite" in export_help.stdout + export_help.stderr


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
  args = [SMOKE, "--config.num_updates=12", "--config.checkpoint_every=100",
          "--config.log_every=1"]
  straight = _launch("finetune", *args, f"--workdir={tmp_path / 'straight'}")
  assert straight.returncode == 0, straight.stderr[-3000:]

  workdir = tmp_path / "preempted"
  proc = subprocess.Popen([sys.executable, "-m", "ctrl_jax.launch.finetune", *args,
                           f"--workdir={workdir}"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith("[finetune] 3/12"):
      proc.send_signal(signal.SIGTERM)
      break
  rest, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM: stopped after update" in rest
  saved = sorted(int(d) for d in os.listdir(workdir / "finetune" / "ckpt") if d.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < 12  # checkpoint_every=100: only the preemption's

  resumed = _launch("finetune", *args, f"--workdir={workdir}")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from {workdir}/finetune/ckpt/{saved[0]}" in resumed.stdout

  config = smoke.get_config()
  config.num_updates = 12
  a, step_a = _final_params(str(tmp_path / "straight"), config)
  b, step_b = _final_params(str(workdir), config)
  assert step_a == step_b == 12
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  rows = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(d / "finetune.jsonl"))}  # noqa: E731
  ra, rb = rows(tmp_path / "straight"), rows(workdir)
  assert set(rb) <= set(ra) and all(ra[s] == rb[s] for s in rb)
