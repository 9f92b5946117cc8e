"""The digits benchmark end to end on the `:quick` variant: pre-train → classifier → CTRL →
evaluate, artifacts and their shapes, fine-tuned beats pre-trained, stages reused, and a run
killed during fine-tuning resumes from its last checkpoint to the same result."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from ctrl_jax import experiment
from ctrl_jax.problems.digits import stages as digits_stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import digits as digits_config  # noqa: E402  pylint: disable=g-import-not-at-top


def test_quick_run_writes_every_artifact_with_the_specified_shapes(quick_run):
  workdir, _, metrics = quick_run
  config = digits_config.get_config("quick")
  per_cell = config.eval.samples_per_cell
  n = 10 * 3 * per_cell
  with np.load(os.path.join(workdir, "eval", "samples.npz")) as f:
    assert f["images"].shape == (n, 8, 8) and f["images"].dtype == np.float32
    assert f["images"].min() >= 0.0 and f["images"].max() <= 1.0
    assert f["c"].shape == (n,) and f["y"].shape == (n,)
    # every (c, y) cell has exactly samples_per_cell requests
    counts = np.bincount(f["c"] * 3 + f["y"], minlength=30)
    assert (counts == per_cell).all()
  with open(os.path.join(workdir, "eval", "metrics.json")) as f:
    saved = json.load(f)
  for model in ("finetuned", "pretrained"):
    m = saved[model]
    assert set(m["tasks"]) == {"ink3"}
    assert 0.0 <= m["tasks"]["ink3"]["macro_f1"] <= 1.0
    assert np.asarray(m["cell_accuracy"]).shape == (10, 3)
    assert np.asarray(m["cell_digit_accuracy"]).shape == (10, 3)
    assert np.isfinite(m["frechet_distance"]) and m["frechet_distance"] > 0
  assert saved["reference"]["judge_heldout_accuracy"] >= 0.96
  assert set(saved["wall_time_s"]) == {"pretrain", "classifier", "finetune", "eval"}
  for png in ("grid.png", "cells.png", "curves.png"):
    assert os.path.getsize(os.path.join(workdir, "eval", png)) > 1000
  for stage in ("pretrain", "classifier"):
    assert os.path.exists(os.path.join(workdir, stage, "info.json"))
  assert os.path.exists(os.path.join(workdir, "pretrain.jsonl"))
  assert os.path.isdir(os.path.join(workdir, "tb", "finetune"))
  assert metrics["finetuned"]["num_samples"] == n
  # TensorBoard: the preview grid (rows = digits, columns = ink3 classes, 8-px images 4×)
  # before the first update, every tb_image_every updates and at the end; the learning rates.
  from ctrl_jax.runtime import progress  # pylint: disable=g-import-not-at-top
  events = progress.read_tensorboard(os.path.join(workdir, "tb", "finetune"))
  grids = [e for e in events if e["tag"] == "samples/grid"]
  assert [e["step"] for e in grids] == [0, 8, 16]
  assert (grids[0]["height"], grids[0]["width"]) == (10 * 34 + 2, 3 * 34 + 2)
  assert grids[0]["image"] != grids[-1]["image"]  # the fine-tuned model's samples moved
  lrs = {(e["step"], e["tag"]): e["scalar"] for e in events if e["tag"].startswith("lr/")}
  assert {step for step, _ in lrs} == {1, 4, 8, 12, 16}
  assert lrs[(16, "lr/lora")] == pytest.approx(config.lr_lora)
  assert lrs[(16, "lr/label_embedding")] == pytest.approx(config.lr_label_embedding)
  assert (16, "lr/unet") not in lrs  # not trained
  # Run records of every stage (config, commit, versions, devices).
  for stage in ("pretrain", "classifier", "finetune", "eval"):
    with open(os.path.join(workdir, "run_info", f"{stage}.json")) as f:
      info = json.load(f)
    assert info["config"]["variant"] == "quick" and info["packages"]["flax"], stage
    assert "commit" in info["git"] and info["devices"]["count"] == jax.device_count()


def test_finetuned_beats_pretrained_on_the_asked_class(quick_run):
  _, _, metrics = quick_run
  fine = metrics["finetuned"]["tasks"]["ink3"]["accuracy"]
  pre = metrics["pretrained"]["tasks"]["ink3"]["accuracy"]
  assert fine > pre + 0.03, (fine, pre)  # measured: 0.808 vs 0.383 (1 device, full back-prop)


def test_the_train_step_compiled_during_pretraining_is_the_one_that_trains(quick_run):
  """From an empty workdir the CTRL train step is compiled on a background thread from the
  problem's shapes while pre-training runs; the first update then compiles nothing (8 devices:
  every argument's sharding must match the abstract one's)."""
  workdir, _, _ = quick_run
  with open(os.path.join(workdir, "finetune", "info.json")) as f:
    info = json.load(f)
  assert info["background_compile_s"] > 0
  assert info["first_update_compiled"] is False


def test_stages_are_reused_and_a_changed_stage_config_is_refused(quick_run, capsys):
  workdir, _, _ = quick_run
  config = digits_config.get_config("quick")
  digits_stages.ensure_pretrained(config, workdir)
  digits_stages.ensure_classifiers(config, workdir)
  assert "reusing" in capsys.readouterr().out
  config.pretrain.num_steps += 1
  with pytest.raises(ValueError, match="num_steps"):
    digits_stages.ensure_pretrained(config, workdir)


def test_killed_finetune_resumes_to_the_uninterrupted_result(quick_run, tmp_path):
  """SIGKILL the CLI right after its first CTRL checkpoint, rerun the same command: it resumes
  from that checkpoint (reusing the earlier stages) and ends with the uninterrupted run's
  parameters."""
  workdir_a, out_a, _ = quick_run
  workdir = tmp_path / "killed"
  for stage in ("pretrain", "classifier"):
    shutil.copytree(os.path.join(workdir_a, stage), workdir / stage)
  config = digits_config.get_config("quick")
  first_ckpt = workdir / "finetune" / "ckpt" / str(config.checkpoint_every)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or ""}
  cmd = [sys.executable, "-m", "ctrl_jax.launch.finetune",
         "--config=" + os.path.join(REPO, "configs", "digits.py:quick"), f"--workdir={workdir}"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  while not first_ckpt.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert first_ckpt.exists(), "no checkpoint before the deadline"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / "eval").exists()
  rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
  assert "reusing" in rerun.stdout
  assert "[finetune] resumed from" in rerun.stdout
  assert os.path.exists(workdir / "eval" / "metrics.json")
  problem = digits_stages.build_problem(config, str(workdir))
  params, step = experiment.load_finetuned(config, str(workdir), problem)
  assert step == config.num_updates
  chex.assert_trees_all_close(jax.device_get(params), jax.device_get(out_a["params"]),
                              atol=1e-6, rtol=1e-6)


def test_export_sampled_by_a_plain_pytorch_loop_matches_the_jax_evaluation(quick_run,
                                                                          tmp_path):
  """The :quick run exported, sampled by diffusers' PyTorch DDIMScheduler + the exported UNet
  with `class_labels`: with the same x_T and per-step noise, the same images as the JAX
  sampler, both deterministic (η = 0) and as trained (η = 1)."""
  torch = pytest.importorskip("torch")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from ctrl_jax.problems.digits import evaluation as digits_eval
  from ctrl_jax.core import train  # pylint: disable=g-import-not-at-top
  from ctrl_jax import export  # pylint: disable=g-import-not-at-top
  from ctrl_jax.models import torch_client  # pylint: disable=g-import-not-at-top
  del torch
  workdir, out, _ = quick_run
  config = digits_config.get_config("quick")
  dest = str(tmp_path / "export")
  export.export(config, workdir, dest)
  files = sorted(os.path.relpath(os.path.join(r, f), dest)
                 for r, _, fs in os.walk(dest) for f in fs)
  assert files == ["c_encoder.safetensors", "ctrl_labels.json", "scheduler/scheduler_config.json",
                   "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
  with open(os.path.join(dest, "ctrl_labels.json")) as f:
    labels = json.load(f)
  assert labels["null_label"] == 3 and labels["tasks"][0]["name"] == "ink3"
  assert len(labels["tasks"][0]["bin_edges"]) == 2
  assert (labels["guidance_scale"], labels["eta"]) == (config.guidance_scale, config.eta)

  problem = digits_stages.build_problem(config, workdir)
  # Host copies: inputs committed to the 8-device mesh would make every fake device run the
  # whole (replicated) sampler on this 2-core machine.
  host = lambda tree: jax.tree_util.tree_map(jnp.asarray, jax.device_get(tree))  # noqa: E731
  setup, params = problem.setup, host(out["params"])
  frozen = host({**problem.frozen, "hparams": train.hparams_from_config(config)})
  unet = torch_client.load_digits_unet(dest)

  # The same x_T and, for η = 1 (as trained), the same per-step noise z_i (the JAX sampler
  # draws z_i from fold_in(key, i)): the same images, sample by sample.
  c, y = digits_eval.eval_requests(setup.label_space, 2)
  x_T = np.random.default_rng(0).standard_normal((len(c), 1, 8, 8)).astype(np.float32)
  policy_eps, _ = train.eps_functions(
      setup, frozen, jnp.asarray(c), setup.label_space.encode(jnp.asarray(y)))
  from ctrl_jax.core import sampling  # pylint: disable=g-import-not-at-top
  key = jax.random.key(0)
  noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), x_T.shape))
                    for i in range(len(setup.timesteps))])
  for eta in (0.0, 1.0):
    x0 = sampling.ddim_sample(policy_eps, params, frozen["schedule"],
                              jnp.asarray(setup.timesteps), jnp.asarray(x_T), key,
                              jnp.float32(eta))
    jax_images = np.asarray(problem.setup.decode_fn(None, x0))
    torch_images = torch_client.sample_digits(dest, c, y, unet=unet, eta=eta, x_T=x_T,
                                              noise=noise)
    diff = np.abs(jax_images - torch_images).max()
    print(f"\nη = {eta:g}, same x_T and noise: JAX vs PyTorch images max|Δ| = {diff:.2e}")
    assert diff < 2e-2, eta
  # The PyTorch loop's own noise (a torch generator, the default) gives other valid images;
  # noise of the wrong shape is refused by name.
  own = torch_client.sample_digits(dest, c, y, unet=unet, seed=7)
  assert own.shape == torch_images.shape and np.abs(own - torch_images).max() > 0.1
  assert 0.0 <= own.min() and own.max() <= 1.0
  with pytest.raises(ValueError, match="noise: shape"):
    torch_client.sample_digits(dest, c, y, unet=unet, noise=noise[:, :3])


def test_lora_only_export_cli(quick_run, tmp_path):
  workdir, _, _ = quick_run
  dest = tmp_path / "lora"
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or ""}
  run = subprocess.run(
      [sys.executable, "-m", "ctrl_jax.launch.export",
       "--config=" + os.path.join(REPO, "configs", "digits.py:quick"), f"--workdir={workdir}",
       f"--out={dest}", "--lora_only"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert (dest / "ctrl_lora.safetensors").exists() and (dest / "unet" / "config.json").exists()
  with open(dest / "unet" / "config.json") as f:
    assert json.load(f).get("num_class_embeds") is None  # the pre-trained UNet
  with open(dest / "ctrl_labels.json") as f:
    assert json.load(f)["lora_only"] is True
  for r, _, fs in os.walk(dest):
    assert not [f for f in fs if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
  # A non-empty --out is refused (one line, nothing touched) unless --overwrite, which replaces
  # only what an export writes: the user's own file survives.
  (dest / "my_notes.txt").write_text("mine")
  labels_before = (dest / "ctrl_labels.json").read_text()
  export_cmd = [sys.executable, "-m", "ctrl_jax.launch.export",
                "--config=" + os.path.join(REPO, "configs", "digits.py:quick"),
                f"--workdir={workdir}", f"--out={dest}"]
  refused = subprocess.run(export_cmd, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
  assert refused.returncode == 1 and "Traceback" not in refused.stderr
  assert "is not empty; pass --overwrite" in refused.stderr
  assert (dest / "ctrl_labels.json").read_text() == labels_before
  replaced = subprocess.run(export_cmd + ["--overwrite"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
  assert replaced.returncode == 0, replaced.stderr[-3000:]
  assert (dest / "my_notes.txt").read_text() == "mine"
  with open(dest / "ctrl_labels.json") as f:
    assert json.load(f)["lora_only"] is False  # the merged export replaced the LoRA-only one
  with open(dest / "unet" / "config.json") as f:
    assert json.load(f)["num_class_embeds"] == 4
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temporary folder left
  bad = subprocess.run(
      [sys.executable, "-m", "ctrl_jax.launch.export",
       "--config=" + os.path.join(REPO, "configs", "digits.py:quick"),
       f"--workdir={tmp_path / 'empty'}", f"--out={tmp_path / 'x'}"], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "no finished pretrain stage" in bad.stderr


def test_compare_baselines_on_the_quick_run(quick_run):
  """The comparison launcher's library function on the :quick run: every guided baseline moves
  y-accuracy above the unguided pre-trained model's (300 requests each, one tuned weight), and
  results.json / results.md / grids are written."""
  from ctrl_jax.baselines import compare  # pylint: disable=g-import-not-at-top
  workdir, _, _ = quick_run
  config = digits_config.get_config("quick")
  config.compare.methods = ("pretrained", "dps", "dps_nojac", "classifier_guidance", "mpgd",
                            "smc", "svdd")
  config.compare.samples_per_cell = 10
  config.compare.batch_size = 60  # the tuning set (30 requests) is one padded batch
  config.compare.smc_particles = 2
  results = compare.run(config, workdir)
  pre = results["pretrained"]["joint_accuracy"]
  for method in config.compare.methods[1:]:
    assert results[method]["joint_accuracy"] > pre, (method, results[method]["joint_accuracy"],
                                                     pre)
    assert os.path.exists(os.path.join(workdir, "compare", f"grid_{method}.png"))
  assert results["smc"]["unet_evals_per_sample"] == 2 * 2 * 2 * 6  # K · (ε + VJP) · CFG · N
  with open(os.path.join(workdir, "compare", "results.json")) as f:
    assert set(json.load(f)["methods"]) == set(config.compare.methods)
  assert os.path.getsize(os.path.join(workdir, "compare", "results.md")) > 200


def test_study_reuses_the_base_run_and_trains_the_other_variant(quick_run):
  """The γ study on the :quick run: γ = 1 is the run itself (not retrained), γ = 3 trains in
  studies/gamma/ctrl_gamma3 on the shared pre-trained model; both are scored on the same
  requests; a rerun trains nothing and gives the same results."""
  from ctrl_jax.baselines import studies  # pylint: disable=g-import-not-at-top
  workdir, _, _ = quick_run
  config = digits_config.get_config("quick")
  config.studies.gammas = (1.0, 3.0)
  results = studies.run(config, workdir, "gamma")
  assert set(results) == {"pretrained", "ctrl_gamma1", "ctrl_gamma3"}
  out = os.path.join(workdir, "studies", "gamma")
  assert not os.path.exists(os.path.join(out, "ctrl_gamma1"))  # the base run, reused
  vdir = os.path.join(out, "ctrl_gamma3")
  assert os.path.islink(os.path.join(vdir, "pretrain"))
  assert os.path.realpath(os.path.join(vdir, "pretrain")) == os.path.realpath(
      os.path.join(workdir, "pretrain"))
  with open(os.path.join(vdir, "finetune", "info.json")) as f:
    info = json.load(f)
  assert info["num_updates"] == config.num_updates and info["seconds_per_update"] > 0
  assert info["step_memory_bytes"]["temp"] > 0 and info["trainable_params"] > 0
  assert info["step_memory_bytes"]["flops"] > 0
  m = results["ctrl_gamma3"]
  assert m["study_value"] == 3.0 and m["num_samples"] == results["pretrained"]["num_samples"]
  # γ = 3 moves y more than the pre-trained model does (as γ = 1 does: tested above).
  assert m["joint_accuracy"] > results["pretrained"]["joint_accuracy"]
  for name in ("results.md", "gamma.png", "grid_ctrl_gamma3.png"):
    assert os.path.getsize(os.path.join(out, name)) > 100
  mtime = os.path.getmtime(os.path.join(vdir, "finetune", "info.json"))
  again = studies.run(config, workdir, "gamma")
  assert {k: v["joint_accuracy"] for k, v in again.items()} == {
      k: v["joint_accuracy"] for k, v in results.items()}
  assert os.path.getmtime(os.path.join(vdir, "finetune", "info.json")) == mtime


def test_study_variants_and_overrides():
  from ctrl_jax.baselines import studies  # pylint: disable=g-import-not-at-top
  config = digits_config.get_config("ink")
  names = [v.name for v in studies.variants(config, "lora")]
  assert names == ["ctrl_rank1", "ctrl_rank4", "ctrl_rank16", "ctrl_full"]
  full = studies.variants(config, "lora")[-1]
  vc = studies.variant_config(config, full.overrides)
  assert vc.full_finetune and vc.lora_rank == 0 and not config.full_finetune
  assert studies.is_base(config, studies.variants(config, "lora")[1].overrides)
  labels = studies.variants(config, "labels")
  assert [v.x for v in labels if v.method == "cfg_triplets"] == [50, 100, 300, 1000]
  dep = [studies.variant_config(config, v.overrides) for v in studies.variants(config, "dependent")]
  assert [(d.task, d.classifier.use_digit, d.reference_grad, d.reference_grad_from)
          for d in dep] == [("inkc", False, True, 0), ("inkc", True, True, 0)]
  # the exact KL gradient in every update (README, study 4); the default switches to it later
  assert config.reference_grad and config.reference_grad_from > 0
  with pytest.raises(ValueError, match="no such field"):
    studies.variant_config(config, (("classifier.nonexistent", 1),))
  with pytest.raises(ValueError, match="--study="):
    studies.variants(config, "nope")


def test_evaluate_launcher_runs_a_baseline(quick_run):
  """`ctrl_jax.launch.evaluate` with config.eval.method = a baseline: the same artifacts in
  DIR/eval_<method>/, the method's samples against the pre-trained model's."""
  from ctrl_jax.baselines import compare  # pylint: disable=g-import-not-at-top
  workdir, _, metrics_ctrl = quick_run
  config = digits_config.get_config("quick")
  config.eval.method = "mpgd"
  config.eval.weight = 1.0
  metrics = compare.evaluate_run(config, workdir)
  out = os.path.join(workdir, "eval_mpgd")
  for name in ("samples.npz", "metrics.json", "summary.md", "grid.png", "cells.png"):
    assert os.path.exists(os.path.join(out, name)), name
  assert metrics["config"]["method"] == "mpgd (weight 1) on p(x | c)"
  # the unguided samples are the CTRL evaluation's (same requests, same seed)
  assert metrics["pretrained"]["joint_accuracy"] == metrics_ctrl["pretrained"]["joint_accuracy"]
  assert metrics["finetuned"]["joint_accuracy"] > metrics["pretrained"]["joint_accuracy"]
  config.eval.weight = -1.0
  config.eval.method = "cfg_triplets"  # never tuned on this run (not in the comparison test)
  with pytest.raises(ValueError, match="no tuned weight"):
    compare.evaluate_run(config, workdir)
