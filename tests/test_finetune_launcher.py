"""The fine-tuning loop and its absl launcher: resume after interruption, CLI end to end."""
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from ctrl_jax import experiment
from ctrl_jax.core import train
from ctrl_jax.runtime import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import smoke  # noqa: E402  pylint: disable=g-import-not-at-top


def _config(num_updates):
  c = smoke.get_config()
  c.num_updates = num_updates
  c.checkpoint_every = 2
  c.log_every = 1
  c.micro_batch = 8  # divisible by the 8 fake devices
  c.num_micro_batches = 1
  return c


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
  """Stopping after update 2 and rerunning ends exactly where an uninterrupted run ends,
  with the same logged history."""
  full = experiment.finetune(_config(4), str(tmp_path / "a"))
  first = experiment.finetune(_config(2), str(tmp_path / "b"))
  assert first["start_step"] == 0
  resumed = experiment.finetune(_config(4), str(tmp_path / "b"))
  assert resumed["start_step"] == 2
  chex.assert_trees_all_close(jax.device_get(full["params"]),
                              jax.device_get(resumed["params"]), atol=1e-6, rtol=1e-6)
  ha = [(r["step"], r["loss"]) for r in full["history"]]
  hb = [(r["step"], r["loss"]) for r in resumed["history"]]
  assert [s for s, _ in hb] == [1, 2, 3, 4]
  np.testing.assert_allclose([l for _, l in ha], [l for _, l in hb], rtol=1e-5)
  assert full["params"]["label_embedding"][-1].sum() == 0


def test_epochs_set_the_run_length_and_info_maps_every_checkpoint_to_its_epoch(tmp_path):
  """num_updates = 0 and checkpoint_every = 0 with 2 epochs of 16 trajectories (8 per update):
  4 updates, a checkpoint per epoch, finetune/info.json gives each kept checkpoint's epoch, and
  `load_finetuned(step=)` restores the one of epoch 1."""
  c = _config(0)
  c.num_epochs, c.samples_per_epoch, c.checkpoint_every = 2, 16, 0
  workdir = str(tmp_path / "run")
  out = experiment.finetune(c, workdir)
  assert (c.num_updates, c.checkpoint_every) == (4, 2) and len(out["history"]) == 4
  with open(os.path.join(workdir, "finetune", "info.json")) as f:
    info = json.load(f)
  assert info["epochs"] == {"samples_per_epoch": 16, "trajectories_per_update": 8,
                            "updates_per_epoch": 2, "num_epochs": 2,
                            "rule": "checkpoint step = epoch × updates_per_epoch"}
  assert info["checkpoints"] == [{"step": 2, "epoch": 1}, {"step": 4, "epoch": 2}]
  problem = experiment.build_problem(c, workdir)
  first, step = experiment.load_finetuned(c, workdir, problem, step=2)
  last, _ = experiment.load_finetuned(c, workdir, problem)
  assert step == 2
  assert not np.allclose(first["label_embedding"], last["label_embedding"])
  with pytest.raises(FileNotFoundError, match=r"update 3 .*kept: \[2, 4\]"):
    experiment.load_finetuned(c, workdir, problem, step=3)


def test_cli_runs_and_writes_artifacts(tmp_path):
  """`python -m ctrl_jax.launch.finetune --config=configs/smoke.py` runs, logs and
  checkpoints; a bad config field gives a message naming it."""
  workdir = tmp_path / "cli"
  env = dict(os.environ, XLA_FLAGS="")
  cmd = [sys.executable, "-m", "ctrl_jax.launch.finetune",
         f"--config={REPO}/configs/smoke.py", f"--workdir={workdir}",
         "--config.num_updates=2", "--config.checkpoint_every=2", "--config.log_every=1"]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "[finetune] 2/2" in out.stdout
  assert "Flax classes are deprecated" not in out.stdout + out.stderr
  rows = [json.loads(l) for l in open(workdir / "finetune.jsonl")]
  assert [r["step"] for r in rows] == [1, 2]
  assert os.path.isdir(workdir / "finetune" / "ckpt" / "2")
  assert os.listdir(workdir / "tb" / "finetune")
  bad = subprocess.run(cmd[:-3] + ["--config.eta=0"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert bad.returncode != 0
  assert "config.eta" in bad.stderr


def test_resume_refuses_a_changed_config_and_warns_on_a_safe_change(tmp_path, capsys):
  """DIR/finetune/config.json is the run's config: a resumed (or rerun) run with another
  lr_lora, kl_convention or lora_rank is refused with both values, before any orbax restore;
  log_every may change (a warning)."""
  workdir = str(tmp_path / "run")
  experiment.finetune(_config(2), workdir)
  with open(os.path.join(workdir, "finetune", "config.json")) as f:
    assert json.load(f)["lr_lora"] == _config(2).lr_lora
  for field, value in (("lr_lora", 5e-3), ("kl_convention", "exact"), ("lora_rank", 8)):
    changed = _config(2)
    changed[field] = value
    with pytest.raises(ValueError, match=f"{field}: saved .* vs now {value!r}"):
      experiment.finetune(changed, workdir)
  safe = _config(2)
  safe.log_every = 2
  experiment.finetune(safe, workdir)
  assert "resuming with changed log_every (1 → 2)" in capsys.readouterr().err


def test_non_finite_updates_are_skipped_then_the_run_stops_and_checkpoints_stay_finite(
    tmp_path):
  """A learning rate of 1e30 makes every update after the first non-finite: those updates are
  skipped (never applied, never saved), and the run stops after max_consecutive_skips."""
  config = _config(10)
  config.lr_lora = config.lr_label_embedding = 1e30
  config.checkpoint_every = 1
  config.max_consecutive_skips = 2
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match="2 updates in a row skipped"):
    experiment.finetune(config, workdir)
  problem = experiment.build_problem(config, workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "finetune", "ckpt"))
  steps = ckpt.all_steps()
  assert steps
  target = train.create_train_state(problem.params, experiment.make_optimizer(config))
  for step in steps:
    state = ckpt.restore(target, step)
    assert bool(train.all_finite(state["params"])), step
  ckpt.close()
  rows = [json.loads(l) for l in open(os.path.join(workdir, "finetune.jsonl"))]
  assert sum(r["skipped"] for r in rows) >= 2
