"""CTRL against the baselines on the digits benchmark, same task, same classifiers, same cost
accounting: `python -m ctrl_jax.launch.compare --config=configs/digits.py:ink --workdir=DIR`.

Methods (docs/method.md §10; the guided ones sample the *pre-trained* model):
  pretrained        unguided DDIM with CFG on c (the lower bound)
  ctrl              the CTRL run in DIR (fine-tuned label embedding + LoRA)
  dps / dps_nojac   reconstruction guidance with / without the UNet Jacobian
  classifier_guidance  a noise-conditional classifier trained on the same labelled pairs
  cfg_triplets      CFG after fine-tuning on (x, c, y) triplets (needs c; same label budget)
  mpgd              manifold-preserving guidance on x̂0
  smc               twisted SMC (TDS), K particles per sample
  svdd              M candidates per step, kept by soft value
Guidance weights are tuned on a small grid per task (a separate tuning set with another seed):
the best y-accuracy whose digit accuracy stays within 3 points of the pre-trained model's.
With config.eval.posterior every method is also scored for posterior fidelity
(`ctrl_jax.problems.digits.posterior`: per-cell kernel MMD² to the exact reference of
p(x | c, y) and to the p̂^γ-weighted one, over the noise floor), and SMC is run again at the
particle counts config.compare.smc_sweep with weight smc_sweep_weight ("smc_K<K>").
Outputs: DIR/compare/results.json, results.md, posterior.png (with posterior fidelity) and one
image grid per method.
"""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ctrl_jax import experiment
from ctrl_jax.baselines import guidance
from ctrl_jax.core import generate
from ctrl_jax.core import train
from ctrl_jax.problems.digits import data as digits_data
from ctrl_jax.problems.digits import evaluation as digits_eval
from ctrl_jax.problems.digits import posterior
from ctrl_jax.problems.digits import stages as digits_stages
from ctrl_jax.runtime import fs
from ctrl_jax.runtime import multihost
from ctrl_jax.runtime import progress

ALL_METHODS = ("pretrained", "ctrl", "dps", "dps_nojac", "classifier_guidance", "cfg_triplets",
               "mpgd", "smc", "svdd")


def compare_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.compare (fields documented in configs/digits.py), with the method names checked."""
  if "compare" not in config:
    raise ValueError("the config has no `compare` section; see configs/digits.py.")
  cc = config.compare
  unknown = set(cc.methods) - set(ALL_METHODS)
  if unknown:
    raise ValueError(f"config.compare.methods has unknown {sorted(unknown)}; expected a subset "
                     f"of {ALL_METHODS}.")
  return cc


def _host(tree):
  return jax.tree_util.tree_map(jnp.asarray, jax.device_get(tree))


def make_guided_sampler(method: str, setup, cc: ml_collections.ConfigDict,
                        noisy_log_prob: Callable | None = None, particles: int | None = None,
                        proposal: str = "twisted"):
  """Jitted `sample(frozen, c [B], y [B, T], key, weight, noisy_params) -> images [B, 8, 8]` of a
  guided baseline on the pre-trained model (weight traced: no recompilation over the grid).
  particles, proposal: SMC's K (default cc.smc_particles) and proposal (`guidance.smc_sample`)."""
  timesteps = jnp.asarray(setup.timesteps)
  shape = tuple(setup.latent_shape)

  def sample(frozen, c, y, key, weight, noisy_params):
    k_x, k_run = jax.random.split(key)
    sched, eta = frozen["schedule"], frozen["hparams"]["eta"]
    log_prob = guidance.digits_log_prob_fn(setup, frozen)
    b = c.shape[0]
    if method == "smc":
      k = particles or cc.smc_particles
      eps = guidance.pretrained_eps_fn(setup, frozen, guidance.repeat_requests(c, k))
      x_T = jax.random.normal(k_x, (b, k) + shape)
      x0, _ = guidance.smc_sample(eps, log_prob, sched, timesteps, x_T, y, k_run, eta, weight,
                                  proposal=proposal)
    else:
      eps = guidance.pretrained_eps_fn(setup, frozen, c)
      x_T = jax.random.normal(k_x, (b,) + shape)
      if method in ("dps", "dps_nojac"):
        x0 = guidance.dps_sample(eps, log_prob, sched, timesteps, x_T, y, k_run, eta, weight,
                                  use_unet_jacobian=method == "dps")
      elif method == "mpgd":
        x0 = guidance.mpgd_sample(eps, log_prob, sched, timesteps, x_T, y, k_run, eta, weight)
      elif method == "svdd":
        eps_m = guidance.pretrained_eps_fn(
            setup, frozen, guidance.repeat_requests(c, cc.svdd_candidates))
        x0 = guidance.svdd_sample(eps_m, log_prob, sched, timesteps, x_T, y, k_run, eta, weight,
                                   num_candidates=cc.svdd_candidates)
      elif method == "classifier_guidance":
        x0 = guidance.classifier_guidance_sample(
            eps, lambda x, t, yy: noisy_log_prob(noisy_params, x, t, yy), sched, timesteps, x_T,
            y, k_run, eta, weight)
      else:
        raise ValueError(f"method={method!r} is not a guided baseline.")
    return setup.decode_fn(None, x0)

  return jax.jit(sample)


def _sample_chunks(fn, c, y, seed, batch_size, name) -> np.ndarray:
  n = len(c)
  out = []
  bar = progress.Progress(f"compare/{name}", -(-n // batch_size))
  for i, start in enumerate(range(0, n, batch_size)):
    idx = np.arange(start, start + batch_size) % n
    out.append(np.asarray(fn(jnp.asarray(c[idx]), jnp.asarray(y[idx]),
                             jax.random.fold_in(jax.random.key(seed), i)))[:min(batch_size,
                                                                                n - start)])
    bar.update(i + 1)
  return np.concatenate(out).astype(np.float32)


def _save_grid(path: str, images: np.ndarray, c: np.ndarray, label: np.ndarray, k: int,
               per_cell: int = 3) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  canvas = np.ones((10 * 10, k * per_cell * 10), np.float32)
  count: dict = {}
  for img, cc, ll in zip(images, c, label):
    i = count.get((cc, ll), 0)
    if i < per_cell:
      count[(cc, ll)] = i + 1
      canvas[cc * 10:cc * 10 + 8, (ll * per_cell + i) * 10:(ll * per_cell + i) * 10 + 8] = img
  big = np.kron(canvas, np.ones((4, 4)))
  fs.save_image(path, Image.fromarray((np.clip(big, 0, 1) * 255).astype(np.uint8)))


class Bench:
  """The comparison's fixed evaluation: the same requests, digit judge and scoring for every
  method (and every study variant, ctrl_jax.baselines.studies), a tuning set with another seed,
  one image grid per method, results kept in `path` (a rerun skips what is there). `out_dir` is
  local or a URI (`ctrl_jax.runtime.fs`); process 0 of a multi-process run writes.

  Methods are `fn(c [B], y [B, T], key) -> images [B, 8, 8]`.
  """

  def __init__(self, config: ml_collections.ConfigDict, problem, out_dir: str,
               results_file: str = "results.json", workdir: str | None = None):
    self.config, self.cc = config, compare_config(config)
    self.out_dir = out_dir
    if multihost.is_main():
      fs.makedirs(out_dir)
    self.setup, self.ls = problem.setup, problem.setup.label_space
    self.frozen = _host({**problem.frozen, "hparams": train.hparams_from_config(config)})
    splits = digits_data.load_splits()
    self.splits = splits
    self.rule = digits_data.LabelRule.from_dict(problem.info["classifier"]["label_rule"])
    self.judge = digits_data.fit_digit_judge(splits["x_train"], splits["c_train"])
    self.held = self.judge.features(splits["x_heldout"])
    self.c_eval, self.y_eval = digits_eval.eval_requests(self.ls, self.cc.samples_per_cell)
    self.c_tune, self.y_tune = digits_eval.eval_requests(self.ls, self.cc.tune_samples_per_cell)
    self.plain = generate.make_sampler(self.setup)
    self.path = fs.join(out_dir, results_file)
    self.results: dict[str, Any] = {}
    if fs.exists(self.path):
      self.results = fs.read_json(self.path).get("methods", {})
    # Posterior fidelity against the reference of `workdir` (drawn from its pre-trained model
    # once, cached in workdir/eval/, shared with the evaluation).
    self.fidelity = None
    if workdir is not None and posterior.enabled(config):
      self.fidelity = posterior.prepare(
          config, workdir, problem, self.plain, self.frozen, self.rule,
          write=multihost.is_main(),
          log=lambda msg: print(msg, flush=True) if multihost.is_main() else None)

  def done(self, name: str) -> bool:
    """Whether `name` is in the results, with its posterior-fidelity scores when they are asked."""
    return name in self.results and (self.fidelity is None or "posterior" in self.results[name])

  def sampler(self, params, frozen=None) -> Callable:
    """The plain DDIM(+CFG) sampler of trainable `params` (CTRL's or CFG-on-triplets')."""
    params = _host(params)
    frozen = self.frozen if frozen is None else frozen
    return lambda c, y, k: self.plain(params, frozen, c, y, k)

  def evaluate(self, name: str, fn: Callable, extra: dict, compiled: bool = False,
               batch_size: int | None = None) -> dict:
    """Samples the evaluation requests with `fn`, scores them, saves the grid and results.

    compiled: `fn` already ran at this batch size (weight tuning calls the same jitted sampler
    with the weight traced), so the timing needs no warm-up call to exclude compilation.
    batch_size: requests per call (default config.compare.batch_size).
    """
    cc = self.cc
    batch_size = batch_size or cc.batch_size
    if not compiled:  # warm-up call first, so the timing excludes compilation
      idx = np.arange(batch_size) % len(self.c_eval)
      jax.block_until_ready(fn(jnp.asarray(self.c_eval[idx]), jnp.asarray(self.y_eval[idx]),
                               jax.random.key(0)))
    t0 = time.time()
    imgs = _sample_chunks(fn, self.c_eval, self.y_eval, cc.seed, batch_size, name)
    wall = time.time() - t0
    m = digits_eval.score(imgs, self.c_eval, self.y_eval, self.rule, self.judge, self.held,
                          self.ls)
    m.update(extra, wall_time_per_100_samples_s=100 * wall / len(self.c_eval))
    label = np.asarray(self.ls.encode(jnp.asarray(self.y_eval)))
    if self.fidelity is not None:
      m["posterior"] = self.fidelity.report({name: imgs}, self.c_eval, label)
    self.results[name] = m
    if multihost.is_main():  # every process keeps the results; process 0 writes them
      _save_grid(fs.join(self.out_dir, f"grid_{name}.png"), imgs, self.c_eval, label,
                 self.ls.num_labels)
      fs.write_json(self.path, {"methods": self.results, "config": cc.to_dict(),
                                "task": self.config.task})
      post = ("" if "posterior" not in m else " MMD²/floor (hard) " + " / ".join(
          f"{v:.2f}" for v in m["posterior"]["references"]["hard"]["per_class"][f"{name}/floor"]))
      print(f"[compare] {name}: y-acc {m['joint_accuracy']:.3f} digit acc "
            f"{m['digit_accuracy']:.3f} FD {m['frechet_distance']:.3f}{post}", flush=True)
    return m

  def tune(self, name: str, fn_of_weight: Callable, grid) -> tuple[float, list]:
    """The grid weight with the best tuning-set accuracy among those keeping digit accuracy
    within `digit_drop_limit` of the pre-trained model's (all of them if none does)."""
    cc = self.cc
    pre_digit = self.results["pretrained"]["digit_accuracy"]
    rows = []
    for w in grid:
      imgs = _sample_chunks(lambda c, y, k: fn_of_weight(c, y, k, w), self.c_tune, self.y_tune,
                            cc.seed + 1, cc.batch_size, f"{name}@{w:g}")
      m = digits_eval.score(imgs, self.c_tune, self.y_tune, self.rule, self.judge, self.held,
                            self.ls)
      rows.append({"weight": float(w), "joint_accuracy": m["joint_accuracy"],
                   "digit_accuracy": m["digit_accuracy"]})
    ok = [r for r in rows if r["digit_accuracy"] >= pre_digit - cc.digit_drop_limit] or rows
    best = max(ok, key=lambda r: r["joint_accuracy"])
    return best["weight"], rows

  def cfg_fn(self, cfg_params) -> Callable:
    """`fn(c, y, key, w)`: the CFG-on-triplets model sampled at guidance scale w."""
    cfg_params = _host(cfg_params)

    def fn(c, y, key, w):
      fr = {**self.frozen, "hparams": {**self.frozen["hparams"], "guidance_scale": jnp.float32(w)}}
      return self.plain(cfg_params, fr, c, y, key)

    return fn


GUIDED = ("dps", "dps_nojac", "classifier_guidance", "mpgd", "smc", "svdd")


def make_method(method: str, config: ml_collections.ConfigDict, workdir: str, bench: Bench,
                problem) -> tuple[Callable, dict]:
  """(`fn(c, y, key, weight) -> images`, info) of one method on the run in `workdir`; trains
  what the method needs first (CTRL, the noise-conditional classifier, CFG on triplets), or
  reuses it. info: UNet evaluations per sample, training time (and a note)."""
  cc = bench.cc
  n_steps = len(bench.setup.timesteps)
  evals = functools.partial(guidance.unet_evals_per_sample, num_steps=n_steps)
  if method == "pretrained":
    fn = bench.sampler(problem.params)
    return (lambda c, y, k, w: fn(c, y, k)), {"unet_evals_per_sample": evals("ddim"),
                                              "training_time_s": 0.0}
  if method == "ctrl":
    try:
      params, step = experiment.load_finetuned(config, workdir, problem)
    except FileNotFoundError:
      step = 0
    if step < config.num_updates:
      params = experiment.finetune(config, workdir, problem)["params"]
    info = fs.read_json(fs.join(workdir, "finetune", "info.json"))
    fn = bench.sampler(params)
    return (lambda c, y, k, w: fn(c, y, k)), {
        "unet_evals_per_sample": evals("ddim"), "training_time_s": info["wall_time_s"],
        "training_note": "CTRL fine-tuning wall time (last invocation that trained)"}
  if method == "cfg_triplets":
    from ctrl_jax.baselines import cfg_triplets  # pylint: disable=g-import-not-at-top
    cfg_params, cfg_info = cfg_triplets.train_cfg_triplets(config, workdir)
    return bench.cfg_fn(cfg_params), {
        "unet_evals_per_sample": evals("ddim"),
        "training_time_s": cfg_info.get("wall_time_s", 0.0),
        "training_note": "fine-tuning on labelled (x, c, y) triplets"}
  if method not in GUIDED:
    raise ValueError(f"unknown method {method!r}; expected one of {ALL_METHODS}.")
  noisy_params, noisy_fn, noisy_time = None, None, 0.0
  if method == "classifier_guidance":
    t0 = time.time()
    k, ls = config.classifier, bench.ls
    x, y = digits_data.sample_label_pairs(bench.splits["x_train"], bench.rule, k.num_labels,
                                     k.label_seed)
    modules, noisy_params = [], []
    for t, n in enumerate(ls.task_classes):
      modules.append(guidance.NoisyDigitClassifier(n))
      noisy_params.append(guidance.fit_noisy_classifier(
          x, y[:, t], n, bench.frozen["schedule"], k.seed + t, steps=cc.noisy_classifier_steps))
    weights = tuple(config.get("reward_weights") or ()) or (1.0,) * ls.num_tasks
    noisy_fn = guidance.make_noisy_log_prob_fn(modules, weights)
    noisy_time = time.time() - t0
  sample = make_guided_sampler(method, bench.setup, cc, noisy_fn)
  frozen = bench.frozen
  base = {"dps_nojac": "dps"}.get(method, method)
  return (lambda c, y, key, w: sample(frozen, c, y, key, jnp.float32(w), noisy_params)), {
      "unet_evals_per_sample": evals(base, use_unet_jacobian=method in ("dps", "smc"),
                                     num_particles=cc.smc_particles,
                                     num_candidates=cc.svdd_candidates),
      "training_time_s": noisy_time}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the comparison (missing stages first: pre-training, classifier, CTRL)."""
  if config.problem != "digits":
    raise ValueError(f"config.problem={config.problem!r}: the comparison runs on 'digits'.")
  cc = compare_config(config)
  problem = digits_stages.build_problem(config, workdir)
  bench = Bench(config, problem, fs.join(workdir, "compare"), workdir=workdir)
  order = ["pretrained"] + [m for m in ALL_METHODS if m in cc.methods and m != "pretrained"]
  for method in order:
    if bench.done(method):
      continue
    fn, info = make_method(method, config, workdir, bench, problem)
    tuned = method in cc.grids and len(cc.grids[method]) > 0
    if tuned:  # on the tuning set, at the evaluation's batch size
      w, rows = bench.tune(method, fn, cc.grids[method])
      info.update(weight=w, tuning=rows)
    else:
      w = 0.0
    bench.evaluate(method, lambda c, y, key, fn=fn, w=w: fn(c, y, key, w), info, compiled=tuned)
  run_smc_sweep(bench)
  write_table(fs.join(bench.out_dir, "results.md"), bench.results, bench.ls.num_tasks > 1)
  plot_posterior(fs.join(bench.out_dir, "posterior.png"), bench.results,
                 digits_eval.cell_names(bench.ls))
  return bench.results


def plot_posterior(path: str, results: dict, cells: list[str]) -> None:
  """The methods' posterior fidelity (hard reference): per class, a bar per method of MMD² /
  floor (log scale; the floor and 2× marked); and y-accuracy against MMD² / floor over all
  cells, one point per method. Written to `path` by process 0; nothing without scores."""
  rows = [(name, m) for name, m in results.items() if "posterior" in m]
  if not rows or not multihost.is_main():
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(14, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
  width = 0.8 / len(rows)
  colors = plt.get_cmap("tab20").colors  # one colour per method (up to 20)
  for j, (name, m) in enumerate(rows):
    color = colors[j % len(colors)]
    pc = m["posterior"]["references"]["hard"]["per_class"][f"{name}/floor"]
    axes[0].bar(np.arange(len(cells)) + (j - (len(rows) - 1) / 2) * width, pc, width,
                label=name, color=color)
    ov = m["posterior"]["references"]["hard"]["overall"][f"{name}/floor"]
    axes[1].plot([ov], [m["joint_accuracy"]], "o", color=color)
    axes[1].annotate(name, (ov, m["joint_accuracy"]), textcoords="offset points", xytext=(4, 3),
                     fontsize=7)
  axes[0].set_yscale("log")
  axes[1].set_xscale("log")
  for line in (1.0, 2.0):
    axes[0].axhline(line, color="k", lw=1, ls="-" if line == 1 else "--")
    axes[1].axvline(line, color="k", lw=1, ls="-" if line == 1 else "--")
  axes[0].set_xticks(np.arange(len(cells)))
  axes[0].set_xticklabels(cells, fontsize=8)
  axes[0].set_ylabel("MMD² / floor (hard reference)")
  axes[0].legend(fontsize=7, ncol=2)
  axes[1].set_xlabel("MMD² / floor, all cells (hard reference)")
  axes[1].set_ylabel("y accuracy")
  fig.tight_layout()
  fs.save_image(path, fig)
  plt.close(fig)


def run_smc_sweep(bench: Bench) -> None:
  """SMC at each K of config.compare.smc_sweep, weight smc_sweep_weight (untuned: the target is
  p_γ with γ = the weight), proposal smc_sweep_proposal, as methods "smc_K<K>"."""
  cc = bench.cc
  w = float(cc.get("smc_sweep_weight", 1.0))
  proposal = cc.get("smc_sweep_proposal", "twisted")
  for k in cc.get("smc_sweep", ()):
    name = f"smc_K{int(k)}"
    if bench.done(name):
      continue
    sample = make_guided_sampler("smc", bench.setup, cc, particles=int(k), proposal=proposal)
    info = {"weight": w, "particles": int(k), "proposal": proposal, "training_time_s": 0.0,
            "unet_evals_per_sample": guidance.unet_evals_per_sample(
                "smc", len(bench.setup.timesteps), use_unet_jacobian=True,
                num_particles=int(k), proposal=proposal)}
    # The comparison's particles per call (batch_size · smc_particles), to bound memory.
    batch = max(1, cc.batch_size * cc.smc_particles // int(k))
    bench.evaluate(name, lambda c, y, key, s=sample: s(bench.frozen, c, y, key, jnp.float32(w),
                                                         None), info, batch_size=batch)


def validate_eval_method(config: ml_collections.ConfigDict) -> None:
  """config.eval.method must be "ctrl" or a method of this comparison (digits only)."""
  method = config.get("eval", {}).get("method", "ctrl")
  if method == "ctrl":
    return
  if config.problem != "digits" or method not in ALL_METHODS or method == "pretrained":
    allowed = ["ctrl"] + ([m for m in ALL_METHODS if m not in ("pretrained", "ctrl")]
                          if config.problem == "digits" else [])
    raise ValueError(f"config.eval.method={method!r}: expected one of {allowed}.")


def evaluate_run(config: ml_collections.ConfigDict, workdir: str,
                 params: dict | None = None) -> dict:
  """What `python -m ctrl_jax.launch.evaluate` runs: the problem's evaluation of the CTRL run
  in `workdir`, or, with config.eval.method set to a method of this comparison (e.g. "dps",
  "svdd"), that method on the same pre-trained model, into DIR/eval_<method>/ (same artifacts).

  The method's weight is config.eval.weight, or (when < 0) the one the comparison tuned
  (DIR/compare/results.json).
  """
  validate_eval_method(config)
  method = config.get("eval", {}).get("method", "ctrl")
  if method == "ctrl":
    return experiment.evaluate(config, workdir, params)
  problem = digits_stages.build_problem(config, workdir)
  bench = Bench(config, problem, fs.join(workdir, "compare"))
  w = float(config.eval.get("weight", -1.0))
  if w < 0:
    if "weight" not in bench.results.get(method, {}):
      raise ValueError(f"config.eval.method={method!r}: no tuned weight in {bench.path}; run "
                       "`python -m ctrl_jax.launch.compare` first or set --config.eval.weight.")
    w = float(bench.results[method]["weight"])
  fn, _ = make_method(method, config, workdir, bench, problem)
  return digits_eval.evaluate(
      config, workdir, problem, problem.params,
      method_sampler=lambda params, frozen, c, y, key: fn(c, y, key, w),
      title=f"{method} (weight {w:g}) on p(x | c)", out_name=f"eval_{method}")


def posterior_columns(name: str, m: dict) -> dict[str, str]:
  """The posterior-fidelity cells of a results row: MMD² / floor per class (hard reference) and
  over all cells (hard, then each γ-weighted reference); {} without posterior scores."""
  if "posterior" not in m:
    return {}
  refs = m["posterior"]["references"]
  out = {"MMD²/floor hard, per class": " / ".join(
      f"{v:.2f}" for v in refs["hard"]["per_class"][f"{name}/floor"])}
  for ref_name, res in refs.items():
    out[f"MMD²/floor {ref_name.replace('gamma', 'γ')}, all"] = f"{res['overall'][f'{name}/floor']:.2f}"
  return out


def write_table(path: str, results: dict, multitask: bool) -> str:
  """The markdown table of `results`, written to `path` (local or URI) by process 0."""
  post_head = next((list(posterior_columns(n, m)) for n, m in results.items()
                    if "posterior" in m), [])
  head = ["method", "y-acc" if not multitask else "joint acc", "macro-F1 (per task)",
          "digit acc", "Fréchet"] + post_head + ["UNet evals / sample", "s / 100 samples",
                                                  "training s", "weight"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, m in results.items():
    f1 = " / ".join(f"{t['macro_f1']:.3f}" for t in m["tasks"].values())
    post = posterior_columns(name, m)
    rows.append("| " + " | ".join([
        name, f"{m['joint_accuracy']:.3f}", f1, f"{m['digit_accuracy']:.3f}",
        f"{m['frechet_distance']:.3f}"] + [post.get(h, "—") for h in post_head] + [
        str(m["unet_evals_per_sample"]), f"{m['wall_time_per_100_samples_s']:.2f}",
        f"{m.get('training_time_s', 0.0):.0f}",
        f"{m['weight']:g}" if "weight" in m else "—"]) + " |")
  text = "\n".join(rows) + "\n"
  if multihost.is_main():
    fs.write_text(path, text)
    print(text, flush=True)
  return text
