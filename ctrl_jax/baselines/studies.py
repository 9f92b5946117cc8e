"""Studies on the digits benchmark: sample efficiency and the paper's open questions.

  python -m ctrl_jax.launch.study --config=configs/digits.py:ink --workdir=DIR --study=labels

Studies (config.studies, documented in configs/digits.py):
  labels  sample efficiency: CTRL vs classifier-free guidance on (x, c, y) triplets with
          num_labels labelled pairs each (CTRL's classifier sees (x, y) only; CFG needs c too).
  gamma   the reward weight γ at a fixed KL weight: the accuracy vs sample-quality frontier.
  lora    LoRA rank on the attention projections vs full fine-tuning of the UNet: accuracy,
          seconds per update, trainable parameters and XLA's memory plan of the train step.
  dependent  a control that violates y ⟂ c | x: "inkc2" = ink above the median of the image's
          *own digit class*. CTRL with the c-blind reward p̂(y | x) against CTRL with
          p̂(y | x, c) (the asked digit passed to the reward), same labelled pairs.
  posterior  CTRL as a posterior sampler: DIR's run and the config overrides of
          studies.posterior_variants (γ, KL weight, updates, seeds, …), each scored for accuracy
          and posterior fidelity (MMD² / floor, `ctrl_jax.problems.digits.posterior`): the
          trade-off curve, one point per setting.
Every variant shares DIR's pre-trained model (and DIR's classifier when its classifier config is
DIR's), trains in DIR/studies/<study>/<variant>/ (resumable like any run) and is scored by the
comparison's fixed evaluation (ctrl_jax.baselines.compare.Bench: same requests, judge and seeds as
`ctrl_jax.launch.compare`). A variant equal to DIR's own config is DIR's own CTRL run.
Outputs: DIR/studies/<study>/results.json, results.md, <study>.png and one grid per variant.
DIR is local or a URI (`ctrl_jax.runtime.fs`); process 0 of a multi-process run writes.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import os
from typing import Any

import ml_collections

from ctrl_jax import experiment
from ctrl_jax.baselines import compare
from ctrl_jax.problems.digits import stages as digits_stages
from ctrl_jax.runtime import fs
from ctrl_jax.runtime import multihost

STUDIES = ("labels", "gamma", "lora", "dependent", "posterior")


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str             # results key and grid name
  overrides: tuple      # ((dotted config field, value), ...)
  method: str = "ctrl"  # "ctrl" or "cfg_triplets"
  x: Any = None         # the studied value (plots)


def variants(config: ml_collections.ConfigDict, study: str) -> list[Variant]:
  s = config.studies
  if study == "labels":
    out = []
    for n in s.num_labels:
      out.append(Variant(f"ctrl_n{n}", (("classifier.num_labels", int(n)),), "ctrl", int(n)))
      out.append(Variant(f"cfg_triplets_n{n}", (("classifier.num_labels", int(n)),),
                         "cfg_triplets", int(n)))
    return out
  if study == "gamma":
    return [Variant(f"ctrl_gamma{g:g}", (("gamma", float(g)),), "ctrl", float(g))
            for g in s.gammas]
  if study == "lora":
    out = [Variant(f"ctrl_rank{r}", (("lora_rank", int(r)), ("full_finetune", False)), "ctrl",
                   f"rank {r}") for r in s.lora_ranks]
    if s.full_finetune:
      n = int(s.get("full_finetune_updates", 0)) or int(config.num_updates)
      out.append(Variant("ctrl_full", (("lora_rank", 0), ("full_finetune", True),
                                       ("lr_unet", float(s.full_finetune_lr)),
                                       ("num_updates", n)), "ctrl",
                         "full" if n == config.num_updates else f"full, {n} updates"))
    return out
  if study == "dependent":
    exact = (("reference_grad", bool(s.dependent_reference_grad)), ("reference_grad_from", 0))
    return [Variant(f"ctrl_{name}", (("task", "inkc"), ("classifier.use_digit", aware)) + exact,
                    "ctrl", label) for name, aware, label in (("blind", False, "p̂(y | x)"),
                                                       ("aware", True, "p̂(y | x, c)"))]
  if study == "posterior":
    out = [Variant("ctrl_default", (), "ctrl", "default")]  # DIR's own run
    for spec in s.posterior_variants:
      overrides = tuple(_parse_override(item) for item in spec.split(","))
      name = "ctrl_" + "_".join(f"{k.split('.')[-1]}{v:g}" if isinstance(v, float) else
                                f"{k.split('.')[-1]}{v}" for k, v in overrides)
      out.append(Variant(name, overrides, "ctrl", spec))
    return out
  raise ValueError(f"--study={study!r}; expected one of {STUDIES}.")


_SHORT = {  # field → its plot label ("" = left out)
    "kl_convention": lambda v: "exact KL" if v == "exact" else "official KL",
    "gamma": lambda v: f"γ {v:g}", "kl_weight": lambda v: "" if v == 1 else f"KL weight {v:g}",
    "reference_grad_from": lambda v: "", "reward_log_eps": lambda v:
    "" if v == 0 else f"log(p̂ + {v:g})", "num_updates": lambda v: f"{v} updates",
    "seed": lambda v: f"seed {v}", "lora_rank": lambda v: f"rank {v}"}


def short_label(v: Variant) -> str:
  """A variant's plot label: its overrides, abbreviated ("default" for none)."""
  parts = [_SHORT[k.split(".")[-1]](val) if k.split(".")[-1] in _SHORT else f"{k}={val}"
           for k, val in v.overrides]
  return ", ".join(p for p in parts if p) or str(v.x)


def _parse_override(item: str) -> tuple[str, Any]:
  """"kl_weight=0.1" → ("kl_weight", 0.1) (a Python literal, else the string)."""
  key, sep, value = item.strip().partition("=")
  if not sep:
    raise ValueError(f"studies.posterior_variants: {item!r} is not field=value.")
  try:
    return key.strip(), ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    return key.strip(), value.strip()


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def variant_config(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  out = copy.deepcopy(config)
  with out.unlocked():
    for dotted, value in overrides:
      *parents, leaf = dotted.split(".")
      node = out
      for part in parents:
        node = node[part]
      if leaf not in node:
        raise ValueError(f"study override {dotted}: the config has no such field.")
      node[leaf] = value
  return out


def is_base(config: ml_collections.ConfigDict, overrides) -> bool:
  """True when the overrides leave the config as it is (the variant is DIR's own run)."""
  return all(_get(config, k) == v for k, v in overrides)


def variant_workdir(workdir: str, study: str, variant: Variant,
                    config: ml_collections.ConfigDict) -> str:
  """DIR for the base variant, else DIR/studies/<study>/<variant> sharing DIR's stages:
  symbolic links to them in a local DIR, copies of their outputs in a remote one (object stores
  have no links)."""
  if is_base(config, variant.overrides):
    return workdir
  vdir = fs.join(workdir, "studies", study, variant.name)
  vconfig = variant_config(config, variant.overrides)
  shared = ["pretrain"]
  if vconfig.classifier.to_dict() == config.classifier.to_dict() and vconfig.task == config.task:
    shared.append("classifier")
  if multihost.is_main():
    fs.makedirs(vdir)
    for stage in shared:
      _share_stage(fs.join(workdir, stage), fs.join(vdir, stage))
  multihost.barrier(f"share stages with {vdir}")
  return vdir


def _share_stage(src: str, dst: str) -> None:
  """Makes the finished stage folder `src` visible as `dst`: a symbolic link (local), or a copy
  of its outputs without its training checkpoints (ckpt/), info.json last (remote)."""
  local_src, local_dst = fs.local_path(src), fs.local_path(dst)
  if local_src is not None and local_dst is not None:
    if not os.path.lexists(local_dst):
      os.symlink(os.path.abspath(local_src), local_dst)
    return
  if fs.exists(fs.join(dst, "info.json")):
    return
  names = [f for f in fs.walk_files(src)
           if f.split("/")[0] != "ckpt" and f != "info.json"] + ["info.json"]
  for name in names:
    fs.write_bytes(fs.join(dst, name), fs.read_bytes(fs.join(src, name)))


def _ctrl(bench: compare.Bench, vconfig, vdir: str) -> tuple[Any, dict]:
  problem = digits_stages.build_problem(vconfig, vdir)
  info_path = fs.join(vdir, "finetune", "info.json")
  try:
    params, step = experiment.load_finetuned(vconfig, vdir, problem)
  except FileNotFoundError:
    step = 0
  info = fs.read_json(info_path) if fs.exists(info_path) else {}
  if step < vconfig.num_updates or "flops" not in (info.get("step_memory_bytes") or {}):
    params = experiment.finetune(vconfig, vdir, problem, measure_memory=True)["params"]
    info = fs.read_json(info_path)
  extra = {"training_time_s": info["wall_time_s"],
           "seconds_per_update": info.get("seconds_per_update"),
           "trainable_params": info.get("trainable_params"),
           "step_memory_bytes": info.get("step_memory_bytes"),
           "classifier": problem.info["classifier"].get("tasks")}
  return bench.sampler(params), extra


def run(config: ml_collections.ConfigDict, workdir: str, study: str) -> dict[str, Any]:
  """Runs (or resumes) one study; returns its results {variant: metrics}."""
  if config.problem != "digits":
    raise ValueError(f"config.problem={config.problem!r}: the studies run on 'digits'.")
  vs = variants(config, study)
  out_dir = fs.join(workdir, "studies", study)
  problem = digits_stages.build_problem(config, workdir)  # DIR's stages first (shared)
  bench_config = config
  if study == "dependent":  # another task: scored by its own label rule (the first variant's)
    bench_config = variant_config(config, vs[0].overrides)
    problem = digits_stages.build_problem(bench_config,
                                            variant_workdir(workdir, study, vs[0], config))
  # Posterior fidelity against DIR's reference (not for "dependent": another task's cells).
  bench = compare.Bench(bench_config, problem, out_dir,
                        workdir=None if study == "dependent" else workdir)
  if not bench.done("pretrained"):
    bench.evaluate("pretrained", bench.sampler(problem.params), {"training_time_s": 0.0})
  for v in vs:
    if bench.done(v.name):
      continue
    vconfig = variant_config(config, v.overrides)
    if v.method == "ctrl":
      fn, extra = _ctrl(bench, vconfig, variant_workdir(workdir, study, v, config))
    elif v.method == "cfg_triplets":
      from ctrl_jax.baselines import cfg_triplets  # pylint: disable=g-import-not-at-top
      n = vconfig.classifier.num_labels
      cfg_params, cfg_info = cfg_triplets.train_cfg_triplets(
          config, workdir, num_labels=None if n == config.classifier.num_labels else n)
      cfg_fn = bench.cfg_fn(cfg_params)
      w, rows = bench.tune(v.name, cfg_fn, bench.cc.grids["cfg_triplets"])
      fn = lambda c, y, key, cfg_fn=cfg_fn, w=w: cfg_fn(c, y, key, w)  # noqa: E731
      extra = {"weight": w, "tuning": rows, "training_time_s": cfg_info.get("wall_time_s", 0.0)}
    else:
      raise ValueError(f"variant {v.name}: unknown method {v.method!r}.")
    bench.evaluate(v.name, fn, {**extra, "study_value": v.x, "method": v.method,
                                "overrides": [list(o) for o in v.overrides]},
                   compiled=v.method == "cfg_triplets")  # its tuning compiled the sampler
  results = {v.name: bench.results[v.name] for v in vs}
  results["pretrained"] = bench.results["pretrained"]
  write_table(fs.join(out_dir, "results.md"), study, vs, results)
  extra = None
  if study == "posterior" and bench.fidelity is not None:
    extra = posterior_extra(config, workdir, bench)
    if multihost.is_main():
      fs.write_json(fs.join(out_dir, "targets.json"), extra)
  plot(fs.join(out_dir, f"{study}.png"), study, vs, results, config.task, extra)
  return results


def posterior_extra(config: ml_collections.ConfigDict, workdir: str, bench: compare.Bench
                    ) -> dict:
  """What the "posterior" plot adds to the CTRL variants: the exact targets p_γ at
  studies.posterior_gammas (`posterior.target_curve`, at the comparison's samples per cell) and
  the comparison's methods when DIR/compare/results.json exists."""
  from ctrl_jax.problems.digits import posterior  # pylint: disable=g-import-not-at-top
  path = fs.join(workdir, "compare", "results.json")
  methods = fs.read_json(path).get("methods", {}) if fs.exists(path) else {}
  return {"target": posterior.target_curve(bench.fidelity, config.studies.posterior_gammas,
                                           int(bench.cc.samples_per_cell)),
          "methods": {n: {"joint_accuracy": m["joint_accuracy"], "posterior": m["posterior"]}
                      for n, m in methods.items()
                      if "posterior" in m and n not in ("ctrl", "pretrained")}}


def _mib(m: dict) -> str:
  mem = m.get("step_memory_bytes")
  return f"{mem['peak_estimate'] / 2**20:.1f}" if mem else "—"


def _gflops(m: dict) -> str:
  flops = (m.get("step_memory_bytes") or {}).get("flops")
  return f"{flops / 1e9:.2f}" if flops else "—"


def _classifier_acc(m: dict) -> str:
  tasks = m.get("classifier") or {}
  return " / ".join(f"{t['heldout_acc']:.3f}" for t in tasks.values()) or "—"


def write_table(path: str, study: str, vs: list[Variant], results: dict) -> str:
  """The markdown table of a study's `results`, written to `path` (local or URI) by process 0."""
  post_head = list(compare.posterior_columns("pretrained", results["pretrained"]))
  head = ["variant", "method", "value", "y-acc", "digit acc", "Fréchet"] + post_head + [
      "training s", "s / update", "GFLOP / update", "trainable params", "step memory MiB",
      "reward classifier held-out acc"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  pre = results["pretrained"]
  pre_post = compare.posterior_columns("pretrained", pre)
  rows.append(f"| pretrained | — | — | {pre['joint_accuracy']:.3f} | "
              f"{pre['digit_accuracy']:.3f} | {pre['frechet_distance']:.3f} | "
              + "".join(f"{pre_post[h]} | " for h in post_head) + "0 | — | — | 0 | — | — |")
  for v in vs:
    m = results[v.name]
    spu = m.get("seconds_per_update")
    post = compare.posterior_columns(v.name, m)
    rows.append("| " + " | ".join([
        v.name, v.method, str(v.x).replace("|", "\\|"), f"{m['joint_accuracy']:.3f}",
        f"{m['digit_accuracy']:.3f}",
        f"{m['frechet_distance']:.3f}"] + [post.get(h, "—") for h in post_head] + [
        f"{m.get('training_time_s', 0.0):.0f}",
        f"{spu:.2f}" if spu else "—", _gflops(m), str(m.get("trainable_params") or "—"),
        _mib(m),
        _classifier_acc(m)]) + " |")
  text = "\n".join(rows) + "\n"
  if multihost.is_main():
    fs.write_text(path, text)
    print(f"[study/{study}]\n{text}", flush=True)
  return text


def plot(path: str, study: str, vs: list[Variant], results: dict, task: str = "",
         extra: dict | None = None) -> None:
  """The study's figure, written to `path` (local or URI) by process 0. extra ("posterior"):
  `posterior_extra`'s exact targets and comparison methods, drawn beside the variants."""
  if not multihost.is_main():
    return
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  pre = results["pretrained"]
  if study == "labels":
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for method, style in (("ctrl", "o-"), ("cfg_triplets", "s--")):
      pts = sorted((v.x, results[v.name]) for v in vs if v.method == method)
      xs = [p[0] for p in pts]
      axes[0].plot(xs, [p[1]["joint_accuracy"] for p in pts], style, label=method)
      axes[1].plot(xs, [p[1]["digit_accuracy"] for p in pts], style, label=method)
    for ax, key, name in ((axes[0], "joint_accuracy", "y accuracy"),
                          (axes[1], "digit_accuracy", "digit accuracy")):
      ax.axhline(pre[key], color="grey", ls=":", label="pre-trained")
      ax.set_xscale("log")
      ax.set_xlabel("labelled pairs (num_labels)")
      ax.set_ylabel(name)
      ax.legend(fontsize=8)
  elif study == "gamma":
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, name in ((axes[0], "frechet_distance", "Fréchet distance (lower is better)"),
                          (axes[1], "digit_accuracy", "digit accuracy")):
      xs = [results[v.name][key] for v in vs]
      ys = [results[v.name]["joint_accuracy"] for v in vs]
      ax.plot(xs, ys, "o-")
      for v, x, y in zip(vs, xs, ys):
        ax.annotate(f"γ={v.x:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
      ax.plot([pre[key]], [pre["joint_accuracy"]], "kx", label="pre-trained")
      ax.set_xlabel(name)
      ax.set_ylabel("y accuracy")
      ax.legend(fontsize=8)
  elif study == "lora":
    fig, axes = plt.subplots(1, 5, figsize=(16, 3.4))
    names = [str(v.x).replace(", ", "\n") for v in vs]
    plan = [results[v.name].get("step_memory_bytes") or {} for v in vs]
    for ax, vals, name in (
        (axes[0], [results[v.name]["joint_accuracy"] for v in vs], "y accuracy"),
        (axes[1], [results[v.name]["digit_accuracy"] for v in vs], "digit accuracy"),
        (axes[2], [results[v.name].get("seconds_per_update") or 0 for v in vs],
         "s / update (in the run)"),
        (axes[3], [p.get("flops", 0) / 1e9 for p in plan], "GFLOP / update (XLA)"),
        (axes[4], [p.get("peak_estimate", 0) / 2**20 for p in plan],
         "train-step memory (MiB, XLA plan)")):
      ax.bar(names, vals)
      ax.set_title(name, fontsize=9)
  elif study == "posterior":
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    rows = [("pre-trained", "pretrained", pre)] + [(short_label(v), v.name, results[v.name])
                                                   for v in vs]
    for ax, which, name in ((axes[0], "high", "MMD² / floor, highest class (hard reference)"),
                            (axes[1], "all", "MMD² / floor, all cells (hard reference)")):
      for i, (label, key, m) in enumerate(rows):
        if "posterior" not in m:
          continue
        res = m["posterior"]["references"]["hard"]
        x = res["per_class"][f"{key}/floor"][-1] if which == "high" else \
            res["overall"][f"{key}/floor"]
        ax.plot([x], [m["joint_accuracy"]], "kx" if key == "pretrained" else "o")
        ax.annotate(label, (x, m["joint_accuracy"]), textcoords="offset points",
                    xytext=(4, 3) if i % 2 else (4, -9), fontsize=7)  # alternate: less overlap
      if extra:
        tgt = extra["target"]
        xs = [p["per_class"][-1] if which == "high" else p["overall"] for p in tgt]
        ax.plot(xs, [p["accuracy"] for p in tgt], "-", color="grey", lw=1,
                label="exact p_γ (reference, no sampling error)")
        for p, x in zip(tgt, xs):
          ax.annotate(f"γ={p['gamma']:g}", (x, p["accuracy"]), textcoords="offset points",
                      xytext=(-4, -10), fontsize=6, color="grey")
        for method, m in extra["methods"].items():
          res = m["posterior"]["references"]["hard"]
          x = res["per_class"][f"{method}/floor"][-1] if which == "high" else \
              res["overall"][f"{method}/floor"]
          ax.plot([x], [m["joint_accuracy"]], "s", color="tab:grey", ms=4)
          ax.annotate(method, (x, m["joint_accuracy"]), textcoords="offset points",
                      xytext=(4, -8), fontsize=6, color="tab:grey")
        ax.legend(fontsize=7, loc="center right")
      ax.axvline(2.0, color="grey", ls="--", lw=1)
      ax.axvline(1.0, color="grey", ls=":", lw=1)
      ax.set_xscale("log")
      ax.xaxis.set_major_locator(ticker.FixedLocator([0.5, 1, 2, 5, 10, 20, 50]))
      ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
      ax.set_xlabel(name)
      ax.set_ylabel("y accuracy")
  elif study == "dependent":
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    names = ["pre-trained"] + [str(v.x) for v in vs]
    rows = [pre] + [results[v.name] for v in vs]
    cls = [float("nan")] + [next(iter((r.get("classifier") or {}).values()),
                                 {}).get("heldout_acc", float("nan")) for r in rows[1:]]
    for ax, vals, name in (
        (axes[0], [r["joint_accuracy"] for r in rows], "y accuracy (inkc2, true label)"),
        (axes[1], [r["digit_accuracy"] for r in rows], "digit accuracy"),
        (axes[2], cls, "reward classifier held-out accuracy")):
      ax.bar(names, vals)
      ax.set_ylim(0, 1)
      ax.set_title(name, fontsize=9)
  else:
    raise ValueError(study)
  fig.suptitle(f"digits {task} — study: {study}", fontsize=10)
  fig.tight_layout()
  # pylint: disable-next=g-import-not-at-top
  from ctrl_jax.problems.digits import plots as digits_plots
  digits_plots.save_figure(path, fig)
