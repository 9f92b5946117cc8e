"""The fine-tuning loop and its absl launcher: resume after interruption, CLI end to end."""
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np

from ctrl_jax import experiment

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
