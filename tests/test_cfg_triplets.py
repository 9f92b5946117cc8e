"""The CFG-on-triplets baseline on a tiny setting: the `:quick` digits config with a random-init
UNet standing in for the pre-trained one (written as a finished pretrain stage, so the stage
code runs unchanged), a few steps on a 1-device mesh."""
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ctrl_jax.baselines import cfg_triplets
from ctrl_jax.core import generate
from ctrl_jax.core import train
from ctrl_jax.problems.digits import data as digits_data
from ctrl_jax.problems.digits import evaluation as digits_eval
from ctrl_jax.problems.digits import model as digits_model
from ctrl_jax.problems.digits import stages as digits_stages
from ctrl_jax.runtime import checkpoint
from ctrl_jax.runtime import sharding as shd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import digits as digits_config  # noqa: E402  pylint: disable=g-import-not-at-top

STEPS = 24


def tiny_config() -> ml_collections.ConfigDict:
  config = digits_config.get_config("quick")
  config.baselines = ml_collections.ConfigDict()
  config.baselines.cfg = ml_collections.ConfigDict(dict(
      steps=STEPS, batch=16, log_every=4, checkpoint_every=STEPS // 2, lr_lora=3e-3,
      lr_label_embedding=3e-2))
  return config


def write_fake_pretrain(config, workdir):
  """A random-init p(x | c) saved as a completed pretrain stage (ensure_pretrained reuses it)."""
  unet, _ = digits_stages.pretrained_target(config)
  pre = digits_model.init_params(jax.random.key(0), unet, config.pretrain.context_dim)
  os.makedirs(os.path.join(workdir, "pretrain"))
  checkpoint.save_tree(os.path.join(workdir, "pretrain", "final"), pre)
  with open(os.path.join(workdir, "pretrain", "info.json"), "w") as f:
    json.dump({"config": json.loads(config.pretrain.to_json())}, f)
  return unet, pre


@pytest.fixture(scope="module")
def mesh():
  return shd.make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mesh):
  workdir = str(tmp_path_factory.mktemp("cfg"))
  config = tiny_config()
  unet, pre = write_fake_pretrain(config, workdir)
  params, info = cfg_triplets.train_cfg_triplets(config, workdir, mesh=mesh)
  return workdir, config, unet, pre, params, info


def test_label_indices_reproduce_sample_label_pairs():
  splits = digits_data.load_splits()
  rule = digits_data.make_label_rule("multitask", splits["x_train"])
  for n, seed in ((300, 0), (50, 3)):
    idx = cfg_triplets.sample_label_indices(len(splits["x_train"]), n, seed)
    x, y = digits_data.sample_label_pairs(splits["x_train"], rule, n, seed)
    np.testing.assert_array_equal(splits["x_train"][idx], x)
    d = cfg_triplets.labelled_triplets(splits["x_train"], splits["c_train"], rule, n, seed)
    np.testing.assert_array_equal(d["x"], x)
    np.testing.assert_array_equal(d["y"], y)
    np.testing.assert_array_equal(d["c"], splits["c_train"][idx])


def test_cfg_config_defaults_overrides_and_typos():
  config = digits_config.get_config("ink")  # no overrides in the default variant
  assert cfg_triplets.cfg_config(config) == cfg_triplets.default_cfg_config()
  assert cfg_triplets.cfg_config(digits_config.get_config("quick")).steps == 30
  config = tiny_config()
  cfg = cfg_triplets.cfg_config(config)
  assert cfg.steps == STEPS and cfg.p_uncond == 0.1 and cfg.p_uncond_c == 0.1
  config.baselines.cfg.p_uncnd = 0.2
  with pytest.raises(ValueError, match="p_uncnd"):
    cfg_triplets.cfg_config(config)


def test_training_reduces_the_triplet_loss_and_learns_the_label_table(trained):
  workdir, config, unet, pre, params, info = trained
  cfg = cfg_triplets.cfg_config(config)
  ls = digits_stages.label_space(config.task)
  model = digits_stages.build_setup(
      config, unet, digits_stages.classifier_modules(config.task)).model
  init = model.init_ctrl_params(jax.random.key(cfg.seed), pre["unet"])
  splits = digits_data.load_splits()
  rule = digits_data.make_label_rule(config.task, splits["x_train"])
  d = cfg_triplets.labelled_triplets(splits["x_train"], splits["c_train"], rule, 128, 7)
  batch = {"x": jnp.asarray(digits_model.to_model_space(d["x"])), "c": jnp.asarray(d["c"]),
           "label": ls.encode(jnp.asarray(d["y"]))}
  frozen = cfg_triplets.make_frozen(pre, digits_model.make_schedule(config.pretrain), cfg)
  loss = jax.jit(lambda p, k: cfg_triplets.triplet_denoising_loss(p, model, frozen, batch, k))
  before = np.mean([float(loss(init, jax.random.key(i))) for i in range(3)])
  after = np.mean([float(loss(params, jax.random.key(i))) for i in range(3)])
  assert after < 0.9 * before, (before, after)  # measured 1.24 → 0.80
  table = np.asarray(params["label_embedding"])
  assert table.shape == (ls.num_labels + 1, model.time_embed_dim)
  assert (table[-1] == 0.0).all()  # NULL row masked: exactly zero
  assert (np.abs(table[:-1]).max(axis=1) > 1e-3).all()  # every label row learned
  ups = [np.abs(np.asarray(v)).max() for path, v in
         jax.tree_util.tree_leaves_with_path(params["lora"]) if path[-1].key == "up"]
  assert ups and max(ups) > 0.0
  assert info["config"]["num_labels"] == config.classifier.num_labels
  assert sum(info["label_counts"]) == config.classifier.num_labels
  assert np.isfinite(info["final_loss"])


def test_stage_files_resume_reuse_and_refusal(trained, mesh, capsys):
  workdir, config, _, _, params, _ = trained
  stage_dir = os.path.join(workdir, "cfg_triplets")
  assert sorted(os.listdir(os.path.join(stage_dir, "ckpt"))) == [str(STEPS // 2), str(STEPS)]
  assert os.path.exists(os.path.join(workdir, "cfg_triplets.jsonl"))
  # Done: reused, same params.
  again, _ = cfg_triplets.train_cfg_triplets(config, workdir, mesh=mesh)
  assert "[cfg_triplets] reusing" in capsys.readouterr().out
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
  # A changed field is refused, by name.
  changed = tiny_config()
  changed.baselines.cfg.p_uncond = 0.2
  with pytest.raises(ValueError, match="p_uncond: saved 0.1 vs now 0.2"):
    cfg_triplets.train_cfg_triplets(changed, workdir, mesh=mesh)
  # Killed after the half-way checkpoint: resumes there and ends where the full run ended.
  killed = str(os.path.join(os.path.dirname(workdir), "cfg_killed"))
  shutil.copytree(workdir, killed)
  k_dir = os.path.join(killed, "cfg_triplets")
  for name in ("info.json", "params", os.path.join("ckpt", str(STEPS))):
    path = os.path.join(k_dir, name)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  resumed, info = cfg_triplets.train_cfg_triplets(config, killed, mesh=mesh)
  assert f"resumed from {k_dir}/ckpt/{STEPS // 2}" in capsys.readouterr().out
  assert info["start_step"] == STEPS // 2
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), resumed, params)
  # Its checkpoints belong to one config: a different one is refused before resuming.
  shutil.rmtree(os.path.join(k_dir, "params"))
  os.remove(os.path.join(k_dir, "info.json"))
  with pytest.raises(ValueError, match="config.json .*p_uncond"):
    cfg_triplets.train_cfg_triplets(changed, killed, mesh=mesh)


def test_explicit_label_budget_gets_its_own_stage(trained, mesh):
  workdir, config, _, _, _, _ = trained
  config = tiny_config()
  config.baselines.cfg.steps = 2
  _, info = cfg_triplets.train_cfg_triplets(config, workdir, num_labels=40, mesh=mesh)
  assert os.path.exists(os.path.join(workdir, "cfg_triplets_n40", "info.json"))
  assert info["config"]["num_labels"] == 40 and sum(info["label_counts"]) == 40


def test_trained_params_plug_into_the_ctrl_sampler(trained):
  _, config, unet, pre, params, _ = trained
  setup = digits_stages.build_setup(config, unet,
                                      digits_stages.classifier_modules(config.task))
  ctx, null_ctx = digits_model.contexts(pre)
  frozen = {"unet": pre["unet"], "reward": None, "decoder": None, "contexts": ctx,
            "uncond_context": null_ctx, "schedule": digits_model.make_schedule(config.pretrain),
            "hparams": train.make_hparams(gamma=1.0, kl_weight=0.0,
                                          guidance_scale=config.guidance_scale, eta=config.eta)}
  c, y = digits_eval.eval_requests(setup.label_space, 1)  # 30 requests
  sampler = generate.make_sampler(setup)
  images = generate.sample_all(sampler, params, frozen, c, y, seed=0, batch_size=16,
                                  name="cfg_triplets")
  assert images.shape == (len(c), 8, 8) and images.dtype == np.float32
  assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
  # The same requests and seeds with the initial params (= the random "pre-trained" model):
  # the learned control changes the samples.
  init = setup.model.init_ctrl_params(jax.random.key(0), pre["unet"])
  plain = generate.sample_all(sampler, jax.device_get(init), frozen, c, y, seed=0,
                                 batch_size=16, name="pretrained")
  assert np.abs(images - plain).max() > 1e-2
