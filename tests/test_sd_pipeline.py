"""The SD configs' `:tiny` variants end to end on CPU (random tiny SD folder, random CLIP tower
and LAION MLP, synthetic offline images; the real loading, classifier, CTRL, evaluation and
export code): fit classifier → finetune → checkpoint → resume → evaluate → export (multitask;
the single-task configs: classifiers and updates). And the first update of a tiny run on 8 fake
devices has the loss that 1 device computes."""
import io
import json
import os
import re
import sys

import jax
import numpy as np
import pytest

from ctrl_jax import experiment
from ctrl_jax import export
from ctrl_jax.core import rewards
from ctrl_jax.core import train
from ctrl_jax.problems import base
from ctrl_jax.problems.sd import stages as sd_stages
from ctrl_jax.runtime import progress
from ctrl_jax.runtime import sharding as shd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import aesthetic as aesthetic_config  # noqa: E402  pylint: disable=g-import-not-at-top
import compressibility as compressibility_config  # noqa: E402  pylint: disable=g-import-not-at-top
import multitask as multitask_config  # noqa: E402  pylint: disable=g-import-not-at-top

CONFIGS = {"aesthetic": aesthetic_config, "compressibility": compressibility_config,
           "multitask": multitask_config}


def test_official_configs_carry_the_official_settings():
  for name, module in CONFIGS.items():
    c = module.get_config()
    assert (c.num_inference_steps, c.eta, c.guidance_scale, c.lora_rank) == (50, 1.0, 7.5, 4)
    assert (c.gamma, c.kl_weight, c.kl_convention, c.truncation) == (0.1, 0.01, "official",
                                                                     "random")
    assert len(c.prompts) == 45 and len(c.eval.prompts) == 8, name
  assert compressibility_config.get_config().trajectories_per_update == 256
  assert multitask_config.get_config().reward_weights == (1.0, 2.0)
  assert aesthetic_config.get_config().lr_lora == 1e-4


# 60 official epochs of the authors' samples per epoch (their config/condition.py,
# set_config_batch(total_samples_per_epoch=…); docs/method.md §7), in trajectories.
OFFICIAL_TRAJECTORIES = {"aesthetic": 60 * 512, "compressibility": 60 * 512,
                         "multitask": 60 * 1024}


def test_update_counts_are_60_official_epochs_on_any_device_count():
  """num_updates × trajectories_per_update = 30 720 (aesthetic, compressibility) and 61 440
  (multitask) trajectories, on 1 and on 8 devices; one checkpoint per epoch; epoch 47 of
  multitask is update 94, epoch 8 of compressibility update 16."""
  assert OFFICIAL_TRAJECTORIES == {"aesthetic": 30720, "compressibility": 30720,
                                   "multitask": 61440}
  for mesh in (shd.make_mesh(jax.devices()[:1]), shd.make_mesh()):
    for name, module in CONFIGS.items():
      c = module.get_config()
      experiment.fill_epoch_counts(c, mesh)
      micro, num_micro = experiment.batch_arithmetic(c, mesh)
      assert micro * num_micro == c.trajectories_per_update, name
      assert c.num_updates * c.trajectories_per_update == OFFICIAL_TRAJECTORIES[name], name
      per_epoch = experiment.updates_per_epoch(c, mesh)
      assert c.checkpoint_every == per_epoch == {"aesthetic": 1}.get(name, 2), name
      assert c.num_updates == 60 * per_epoch and c.max_checkpoints >= 60, name
  c = multitask_config.get_config()
  experiment.fill_epoch_counts(c, mesh)
  meta = experiment.epoch_metadata(c, mesh, [93, 94, 120])
  assert meta["epochs"]["updates_per_epoch"] == 2 and meta["epochs"]["num_epochs"] == 60
  assert meta["checkpoints"] == [{"step": 93, "epoch": 46.5}, {"step": 94, "epoch": 47},
                                 {"step": 120, "epoch": 60}]
  compress = experiment.epoch_metadata(compressibility_config.get_config(), mesh, [16])
  assert compress["checkpoints"] == [{"step": 16, "epoch": 8}]


def _parse(*overrides):
  """The config as `--config=… --config.FIELD=VALUE` gives it to a launcher."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  values, argv = flags.FlagValues(), ["prog", *overrides]
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_num_epochs_and_num_updates_on_the_command_line():
  """--config.num_epochs=8 sets the run's length (16 compressibility updates); an explicit
  --config.num_updates is kept; a samples_per_epoch that is not a multiple of the update's
  trajectories is refused in one line naming it; :tiny runs its 4 updates, without epochs."""
  mesh = shd.make_mesh()
  path = os.path.join(REPO, "configs", "compressibility.py")
  c = _parse(f"--config={path}", "--config.num_epochs=8")
  experiment.fill_epoch_counts(c, mesh)
  assert (c.num_updates, c.checkpoint_every) == (16, 2)
  c = _parse(f"--config={path}", "--config.num_updates=5")
  experiment.fill_epoch_counts(c, mesh)
  assert (c.num_updates, c.checkpoint_every) == (5, 2)
  c = _parse(f"--config={path}", "--config.samples_per_epoch=300")
  with pytest.raises(ValueError) as e:
    experiment.fill_epoch_counts(c, mesh)
  assert str(e.value) == ("config.samples_per_epoch=300 is not a multiple of the 256 "
                          "trajectories per update (trajectories_per_update).")
  for module in CONFIGS.values():
    t = module.get_config("tiny")
    experiment.fill_epoch_counts(t, mesh)
    assert (t.num_updates, t.checkpoint_every, experiment.updates_per_epoch(t, mesh)) == (4, 2, 0)


def _classifiers(config, workdir, task):
  # the problem's fit_classifier entry point (what the launcher runs; it records the run)
  applies, params, info, _ = base.get("sd").fit_classifier(config, workdir)
  names = sd_stages.label_space(task).task_names
  assert len(applies) == len(params) == len(names)
  for name in names:
    assert np.isfinite(info["tasks"][name]["temperature"])
  with open(os.path.join(workdir, "classifier", "info.json")) as f:
    assert set(json.load(f)["tasks"]) == set(names)
  return names


def test_tiny_aesthetic_classifier_and_updates(tmp_path):
  """`aesthetic` at :tiny: its classifier (random CLIP tower + LAION MLP) and two CTRL updates
  (resume, evaluation and export: the multitask test, same code)."""
  config = aesthetic_config.get_config("tiny")
  workdir = str(tmp_path / "aesthetic")
  _classifiers(config, workdir, "aesthetic")
  config.num_updates = 2
  config.tb_image_every = 0  # the preview images: the multitask test
  out = experiment.finetune(config, workdir)
  losses = [h["loss"] for h in out["history"]]
  assert out["start_step"] == 0 and len(losses) == 2 and np.isfinite(losses).all()
  assert os.path.isdir(os.path.join(workdir, "finetune", "ckpt", "2"))


def test_tiny_compressibility_first_update_is_the_same_on_8_devices_and_on_1(tmp_path):
  """`compressibility` at :tiny: its classifier (JPEG sizes + CNN), two CTRL updates on the 8
  test devices, and the first update's loss recomputed on 1 device (same params, requests and
  key) equals the logged one: sharding changes the layout, not the result."""
  assert jax.device_count() == 8
  config = compressibility_config.get_config("tiny")
  workdir = str(tmp_path / "compressibility")
  _classifiers(config, workdir, "compressibility")
  problem = sd_stages.build_problem(config, workdir)
  config.num_updates = 2
  config.tb_image_every = 0  # the preview images: the multitask test
  out = experiment.finetune(config, workdir, problem=problem)
  losses = [h["loss"] for h in out["history"]]
  assert len(losses) == 2 and np.isfinite(losses).all()

  micro, num_micro = experiment.batch_arithmetic(config, shd.make_mesh())
  assert (micro, num_micro) == (8, 1)
  mesh = shd.make_mesh(jax.devices()[:1])
  optimizer = experiment.make_optimizer(config)
  state = train.create_train_state(problem.params, optimizer, mesh)
  step = train.make_train_step(problem.setup, optimizer, mesh)
  batch = rewards.sample_requests(config.seed, 0, problem.setup.label_space,
                                     problem.num_prompts, num_micro, micro)
  frozen = {**problem.frozen, "hparams": train.hparams_from_config(config)}
  _, metrics = step(state, batch, jax.random.key(config.seed),
                    jax.device_put(frozen, shd.replicated(mesh)))
  one = float(metrics["loss"])
  print(f"\nfirst-update loss: 8 devices {losses[0]:.6f}, 1 device {one:.6f}")
  np.testing.assert_allclose(losses[0], one, rtol=1e-4, atol=1e-5)


def test_tiny_multitask_end_to_end(tmp_path, capsys):
  """`multitask` at :tiny (both rewards, aesthetic and compressibility): classifiers, CTRL
  updates, a resume, evaluation and export; the TensorBoard preview images and learning rates,
  the run records of every stage, the evaluation's PNG files, arrays, grids and LAION scores."""
  task = "multitask"
  config = multitask_config.get_config("tiny")
  workdir = str(tmp_path / task)
  names = _classifiers(config, workdir, task)

  config.num_updates = 2
  first = experiment.finetune(config, workdir)
  assert first["start_step"] == 0
  assert os.path.isdir(os.path.join(workdir, "finetune", "ckpt", "2"))
  config.num_updates = 4
  second = experiment.finetune(config, workdir)
  assert second["start_step"] == 2 and "[finetune] resumed from" in capsys.readouterr().out
  losses = [h["loss"] for h in second["history"]]
  assert len(losses) >= 3 and np.isfinite(losses).all()

  # TensorBoard: the preview grid (rows = eval prompts, columns = the 4 classes, 16-px images
  # shown 4×) before the first update, every tb_image_every updates and at the end of each
  # invocation; the learning rates of LoRA and the label table with every logged update.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  ls = sd_stages.label_space(task)
  events = progress.read_tensorboard(os.path.join(workdir, "tb", "finetune"))
  grids = [e for e in events if e["tag"] == "samples/grid"]
  assert [e["step"] for e in grids] == [0, 2, 4]
  rows = min(4, len(config.eval.prompts))
  picture = np.asarray(Image.open(io.BytesIO(grids[-1]["image"])))
  assert picture.shape == (rows * 66 + 2, ls.num_labels * 66 + 2, 3) == (
      grids[-1]["height"], grids[-1]["width"], 3)
  assert picture.std() > 0 and not np.array_equal(
      picture, np.asarray(Image.open(io.BytesIO(grids[0]["image"]))))  # the model moved
  lrs = {(e["step"], e["tag"]): e["scalar"] for e in events if e["tag"].startswith("lr/")}
  assert {tag for _, tag in lrs} == {"lr/lora", "lr/label_embedding"}
  assert {step for step, _ in lrs} == {1, 2, 3, 4}
  np.testing.assert_allclose(lrs[(4, "lr/lora")], config.lr_lora, rtol=1e-6)
  np.testing.assert_allclose(lrs[(4, "lr/label_embedding")], config.lr_label_embedding,
                             rtol=1e-6)

  metrics = experiment.evaluate(config, workdir, second["params"])
  n = len(config.eval.prompts) * ls.num_labels * config.eval.samples_per_class
  eval_dir = os.path.join(workdir, "eval")
  with np.load(os.path.join(eval_dir, "samples.npz")) as f:
    assert f["y"].shape == (n, ls.num_tasks) and f["prompt"].shape == (n,)
    for model in ("finetuned", "pretrained"):
      assert f[f"laion_score_{model}"].shape == f[f"y_true_{model}"].shape[:1] == (n,)
  for model in ("finetuned", "pretrained"):
    images = np.load(os.path.join(eval_dir, f"images_{model}.npy"))
    assert images.shape == (n, 16, 16, 3) and images.dtype == np.uint8
    pngs = sorted(os.path.relpath(os.path.join(r, f), eval_dir)
                  for r, _, fs in os.walk(os.path.join(eval_dir, "images", model)) for f in fs)
    assert len(pngs) == n and pngs[0] == os.path.join(
        "images", model, "00_cat", "aesthetic-0_compress2-0_0000.png"), pngs[:2]
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(eval_dir, pngs[0]))),
                                  images[0])  # request 0, lossless
    assert os.path.getsize(os.path.join(eval_dir, f"grid_{model}.png")) > 100
    m = metrics[model]
    assert set(m["tasks"]) == set(names)
    shape = (len(config.eval.prompts), ls.num_labels)
    for table in ("cell_accuracy", "cell_laion_score", "cell_clip_score", "cell_jpeg_kb"):
      assert np.asarray(m[table]).shape == shape, table
    assert np.isfinite(m["laion_score"]) and len(m["laion_score_per_label"]) == ls.num_labels
    assert 0.0 <= m["clip_score"] <= 100.0
  assert os.path.getsize(os.path.join(eval_dir, "grid.png")) > 100
  with open(os.path.join(eval_dir, "summary.md")) as f:
    assert "LAION" in f.read()

  # Run records: config, commit (None outside a git checkout), versions, devices, per stage;
  # the resumed fine-tuning keeps its first invocation.
  for stage_name in ("classifier", "finetune", "eval"):
    with open(os.path.join(workdir, "run_info", f"{stage_name}.json")) as f:
      info = json.load(f)
    assert info["config"]["task"] == task and info["packages"]["jax"] == jax.__version__
    commit = info["git"]["commit"]
    assert commit is None or re.fullmatch("[0-9a-f]{40}", commit), commit
    assert info["devices"]["count"] == jax.device_count() and info["process_count"] == 1
  assert info["date"] and info["python"] and info["command"]
  with open(os.path.join(workdir, "run_info", "finetune.json")) as f:
    finetune_info = json.load(f)
  assert [r["config"]["num_updates"] for r in finetune_info["previous"]] == [2]
  assert finetune_info["config"]["num_updates"] == 4

  out = str(tmp_path / "export")
  export.export(config, workdir, out)
  for sub in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
              "tokenizer/vocab.json", "scheduler/scheduler_config.json", "model_index.json",
              "ctrl_labels.json"):
    assert os.path.exists(os.path.join(out, sub)), sub
  with open(os.path.join(out, "unet", "config.json")) as f:
    assert json.load(f)["num_class_embeds"] == ls.num_labels + 1
  with open(os.path.join(out, "ctrl_labels.json")) as f:
    labels = json.load(f)
  assert [t["name"] for t in labels["tasks"]] == list(names)
  assert labels["guidance_scale"] == config.guidance_scale
