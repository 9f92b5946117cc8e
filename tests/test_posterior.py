"""Posterior fidelity: the kernel MMD against closed forms, and on the `:quick` digits problem
the statistic of an independent sample of the target at the noise floor, a wrong sample far
above it, and the reference cache reused."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctrl_jax.core import generate
from ctrl_jax.core import mmd
from ctrl_jax.core import train
from ctrl_jax.problems.digits import data as digits_data
from ctrl_jax.problems.digits import posterior
from ctrl_jax.problems.digits import stages as digits_stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import digits as digits_config  # noqa: E402  pylint: disable=g-import-not-at-top


def _gaussian_mean_kernel(delta2, s2, bandwidth, d):
  """E k(x, y) for x ~ N(μ1, s2 I), y ~ N(μ2, s2 I) in d dims, ‖μ1 − μ2‖² = delta2, Gaussian
  kernel of variance `bandwidth` (a Gaussian integral)."""
  v = bandwidth + 2 * s2
  return (bandwidth / v) ** (d / 2) * np.exp(-delta2 / (2 * v))


def test_mmd_matches_the_closed_form_between_two_gaussians():
  d, s2, bw, n = 4, 1.0, 3.0, 3000
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (rng.normal(size=(n, d)) + np.array([1.0, 0, 0, 0])).astype(np.float32)
  exact = 2 * _gaussian_mean_kernel(0.0, s2, bw, d) - 2 * _gaussian_mean_kernel(1.0, s2, bw, d)
  assert float(mmd.mmd2(x, y, bw, unbiased=True)) == pytest.approx(exact, rel=0.05)
  # The biased estimate is the unbiased one plus its positive null term.
  biased = float(mmd.mmd2(x, y, bw))
  assert biased > float(mmd.mmd2(x, y, bw, unbiased=True))
  assert float(mmd.mmd2(x, x, bw)) == pytest.approx(0.0, abs=1e-6)


def test_weights_are_duplicates_and_the_null_expectation_is_the_mean_floor():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(20, 3)).astype(np.float32)
  y = rng.normal(size=(15, 3)).astype(np.float32)
  counts = rng.integers(1, 4, size=15)
  dup = np.repeat(y, counts, axis=0)
  assert float(mmd.mmd2(x, y, 2.0, y_weights=counts)) == pytest.approx(
      float(mmd.mmd2(x, dup, 2.0)), rel=1e-5)
  assert float(mmd.effective_sample_size(np.ones(7))) == pytest.approx(7.0)
  # E[biased MMD² of n fresh draws against a fixed reference of the same law], averaged over
  # references too, is (1/n + 1/M)(1 − E k): null_expectation, within Monte-Carlo error.
  n, m, bw = 10, 40, 4.0
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = jax.vmap(lambda k: jax.random.normal(k, (n + m, 3)))(keys)
  vals = jax.vmap(lambda a: mmd.mmd2(a[:n], a[n:], bw))(draws)
  big = np.random.default_rng(2).normal(size=(2000, 3)).astype(np.float32)
  expected = float(mmd.null_expectation(big[:m], bw, n))
  closed = (1 / n + 1 / m) * (1 - _gaussian_mean_kernel(0.0, 1.0, bw, 3))
  assert float(jnp.mean(vals)) == pytest.approx(closed, rel=0.03)  # ~3 standard errors
  assert expected == pytest.approx(closed, rel=0.25)  # one reference's estimate of E k


@pytest.fixture(scope="module")
def quick(request, tmp_path_factory):
  """The `:quick` problem (pre-trained model + classifier) and its posterior reference: in the
  workdir of a session-wide `quick_run` fixture when tests/conftest.py has one (its evaluation
  already drew the reference), else pre-trained here (~2 min on 2 cores)."""
  try:
    workdir = request.getfixturevalue("quick_run")[0]
  except pytest.FixtureLookupError:
    workdir = str(tmp_path_factory.mktemp("posterior"))
  config = digits_config.get_config("quick")
  problem = digits_stages.build_problem(config, workdir)
  rule = digits_data.LabelRule.from_dict(problem.info["classifier"]["label_rule"])
  frozen = {**problem.frozen, "hparams": train.hparams_from_config(config)}
  sampler = generate.make_sampler(problem.setup)
  fid = posterior.prepare(config, workdir, problem, sampler, frozen, rule)
  return config, workdir, problem, rule, frozen, sampler, fid


def _cell_draws(ref: posterior.Reference, k: int, n: int, digit_of=lambda c: c,
                label_of=lambda q: q):
  """n accepted draws of cell (digit_of(c), label_of(q)) of `ref` asked for every cell (c, q):
  (images [10·K·n, 8, 8], c, combined label)."""
  imgs, cs, labels = [], [], []
  for c in range(10):
    for q in range(k):
      idx = ref.cell(digit_of(c), label_of(q))[:n]
      assert len(idx) == n, (c, q, len(idx))
      imgs.append(ref.images[idx])
      cs += [c] * n
      labels += [q] * n
  return np.concatenate(imgs), np.asarray(cs), np.asarray(labels)


def test_quick_reference_fills_every_cell_and_is_reused(quick, capsys):
  config, workdir, problem, rule, frozen, sampler, fid = quick
  post = config.eval.posterior
  k = problem.setup.label_space.num_labels
  counts = fid.ref.counts(k)
  assert counts.min() >= post.reference_per_cell + post.floor_per_cell
  # Accepted = the true label rule holds; the stored rewards are CTRL's log p̂(y | x).
  np.testing.assert_array_equal(
      np.asarray(problem.setup.label_space.encode(jnp.asarray(rule.labels(fid.ref.images)))),
      fid.ref.label)
  assert (fid.ref.log_reward <= 1e-5).all()  # log(p̂ + 1e-6), p̂ ≤ 1
  assert (np.argmax(fid.ref.log_reward, -1) == fid.ref.label).mean() > 0.7
  again = posterior.build_reference(config, workdir, problem, sampler,
                                    jax.device_get(problem.params), frozen, rule)
  assert "sampling rounds" not in capsys.readouterr().out  # read from the cache
  np.testing.assert_array_equal(again.images, fid.ref.images)


def test_quick_independent_target_sample_sits_at_the_floor_and_a_wrong_one_far_above(quick):
  """An independent sample of the target (a second reference, another seed, n accepted draws
  per cell) asked for its own cells scores like the floor, on the hard and the γ-weighted
  reference; the next digit's draws of the same class score far above the floor in every
  class, the opposite ink class's draws above it."""
  config, workdir, problem, rule, frozen, sampler, fid = quick
  k = problem.setup.label_space.num_labels
  n = config.eval.posterior.floor_per_cell
  other = config.copy_and_resolve_references()
  other.eval.posterior.seed += 1
  other.eval.posterior.reference_per_cell, other.eval.posterior.floor_per_cell = n, 0
  other.eval.posterior.weighted_pool = 0
  ref2 = posterior.build_reference(other, workdir, problem, sampler,
                                   jax.device_get(problem.params), frozen, rule, write=False)
  right = _cell_draws(ref2, k, n)
  wrong = _cell_draws(ref2, k, n, digit_of=lambda c: (c + 1) % 10)
  swapped = _cell_draws(ref2, k, n, label_of=lambda q: k - 1 - q)  # low ↔ high ink
  out = fid.report({"target": right[0], "wrong": wrong[0], "swapped": swapped[0]},
                   right[1], right[2])
  assert out["samples_per_cell"] == n
  hard = out["references"]["hard"]
  ratio = hard["overall"]["target/floor"]
  assert 0.6 < ratio < 1.6, ratio
  assert 0.6 < hard["overall"]["target/floor_expected"] < 1.6
  assert 0.6 < hard["overall"]["floor"] / hard["overall"]["floor_expected"] < 1.6
  assert min(hard["per_class"]["wrong/floor"]) > 3.0, hard["per_class"]["wrong/floor"]
  low_high = np.asarray(hard["per_class"]["swapped/floor"])[[0, k - 1]]
  assert (low_high > 1.5).all(), low_high
  gamma = out["references"]["gamma=1"]
  assert gamma["overall"]["wrong/floor"] > 3.0 * gamma["overall"]["target/floor"]
  assert np.isfinite(np.asarray(gamma["cells"]["ess"], float)).all()
  lines = posterior.summary_lines(out, ["low", "mid", "high"], models=("target", "wrong"))
  assert sum(line.startswith("| ") for line in lines) == 2 * (1 + 3 + 1)  # head, classes, all


def test_quick_smc_sweep_is_scored_against_the_floor(quick, tmp_path):
  """The comparison's SMC sweep (`compare.run_smc_sweep`) on the :quick problem: one method per
  K with its posterior-fidelity scores and the table's posterior columns."""
  from ctrl_jax.baselines import compare  # pylint: disable=g-import-not-at-top
  config, workdir, problem, *_ = quick
  config = config.copy_and_resolve_references()
  config.compare.smc_sweep = (2,)
  config.compare.samples_per_cell = 2
  config.compare.batch_size = 60
  bench = compare.Bench(config, problem, str(tmp_path / "compare"), workdir=workdir)
  compare.run_smc_sweep(bench)
  m = bench.results["smc_K2"]
  assert m["particles"] == 2 and m["posterior"]["samples_per_cell"] == 2
  ratio = m["posterior"]["references"]["gamma=1"]["overall"]["smc_K2/floor"]
  assert np.isfinite(ratio) and ratio > 0
  table = compare.write_table(str(tmp_path / "results.md"), bench.results, False)
  assert "MMD²/floor hard, per class" in table and "MMD²/floor γ=1, all" in table
  compare.plot_posterior(str(tmp_path / "posterior.png"), bench.results, ["0", "1", "2"])
  assert os.path.getsize(tmp_path / "posterior.png") > 1000


def test_posterior_study_variants_and_the_posterior_config():
  """Every default variant of --study=posterior is a valid override of the ink config, and the
  exact-KL ones (and configs/digits.py:posterior) optimise the γ they name."""
  from ctrl_jax.baselines import studies  # pylint: disable=g-import-not-at-top
  from ctrl_jax.core import objective  # pylint: disable=g-import-not-at-top
  config = digits_config.get_config("ink")
  vs = studies.variants(config, "posterior")
  assert vs[0].name == "ctrl_default" and len({v.name for v in vs}) == len(vs)
  for v in vs[1:]:
    vc = studies.variant_config(config, v.overrides)
    assert not studies.is_base(config, v.overrides), v.name
    if vc.kl_convention == "exact":
      assert vc.reward_log_eps == 0.0 and vc.reference_grad_from == 0, v.name
      assert objective.effective_gamma(vc.gamma, vc.kl_weight, 64, "exact") == vc.gamma
      assert "γ" in studies.short_label(v)
  post = digits_config.get_config("posterior")
  assert objective.effective_gamma(post.gamma, post.kl_weight, 64, post.kl_convention) == 100.0
  assert objective.effective_gamma(config.gamma, config.kl_weight, 64,
                                   config.kl_convention) == pytest.approx(2133.3, abs=0.1)
  with pytest.raises(ValueError, match="not field=value"):
    studies.variants(studies.variant_config(config, [("studies.posterior_variants",
                                                       ("gamma",))]), "posterior")
