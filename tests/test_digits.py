"""Tests of `ctrl_jax.problems.digits.data`: splits, ink / edge label rules, the calibrated reward
classifier, ECE, the digit judge and the Fréchet distance. About 30 s on a 2-core CPU (one classifier fit)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctrl_jax.core import calibration
from ctrl_jax.problems.digits import data as digits_data


@pytest.fixture(scope="module")
def splits():
  return digits_data.load_splits()


@pytest.fixture(scope="module")
def judge(splits):
  return digits_data.fit_digit_judge(splits["x_train"], splits["c_train"], seed=0)


@pytest.fixture(scope="module")
def ink3_fit(splits):
  """The ink3 reward classifier as a run builds it: 300 labels, default settings."""
  rule = digits_data.make_label_rule("ink", splits["x_train"])
  x, y = digits_data.sample_label_pairs(splits["x_train"], rule, 300, seed=0)
  model = digits_data.classifier_for("ink3")
  params, info = digits_data.fit_classifier(x, y[:, 0], model.num_classes, seed=0,
                                       neighbour_diffs=model.neighbour_diffs)
  return rule, model, params, info


def test_splits(splits):
  shapes = {"x_train": (1200, 8, 8), "c_train": (1200,), "x_heldout": (597, 8, 8),
            "c_heldout": (597,)}
  for k, shape in shapes.items():
    assert splits[k].shape == shape, k
  for k in ("x_train", "x_heldout"):
    assert splits[k].dtype == np.float32
    assert splits[k].min() == 0.0 and splits[k].max() == 1.0
    assert np.all(splits[k] * 16 == np.round(splits[k] * 16))  # value / 16, exactly
  for k in ("c_train", "c_heldout"):
    assert splits[k].dtype == np.int32
    assert set(np.unique(splits[k])) == set(range(10))


def _ink_loop(img):
  return sum(float(img[i, j]) for i in range(8) for j in range(8)) / 64


def _edge_loop(img):
  num = 0.0
  for i in range(8):
    for j in range(8):
      if i + 1 < 8:
        num += (float(img[i + 1, j]) - float(img[i, j])) ** 2
      if j + 1 < 8:
        num += (float(img[i, j + 1]) - float(img[i, j])) ** 2
  return num / (sum(float(v) for v in img.ravel()) + digits_data.EDGE_EPS)


def test_ink_edge_match_brute_force(splits):
  x = np.concatenate([splits["x_train"][:3], splits["x_heldout"][:2],
                      np.random.default_rng(0).uniform(-0.1, 1.1, (2, 8, 8)).astype(np.float32)])
  want_ink = np.array([_ink_loop(img) for img in x])
  want_edge = np.array([_edge_loop(img) for img in x])
  for fn, want in ((digits_data.ink, want_ink), (digits_data.edge, want_edge)):
    got_np = fn(x)
    assert isinstance(got_np, np.ndarray) and got_np.shape == (len(x),)
    np.testing.assert_allclose(got_np, want, rtol=1e-5)
    got_jit = jax.jit(fn)(jnp.asarray(x))
    assert isinstance(got_jit, jax.Array)
    np.testing.assert_allclose(np.asarray(got_jit), want, rtol=1e-5)
  assert np.isfinite(digits_data.edge(np.zeros((8, 8), np.float32)))  # epsilon: blank image


def test_ink3_quantile_edges(splits):
  """Class 0 iff ink ≤ q1. ink is a multiple of 1/1024, so images tie at the cut points and the
  classes are 406 / 407 / 387, not 400 each: the quantile property is what holds."""
  rule = digits_data.make_label_rule("ink", splits["x_train"])
  v = digits_data.ink(splits["x_train"])
  q = np.quantile(v, [1 / 3, 2 / 3])
  assert rule.edges == ((float(q[0]), float(q[1])),)
  y = rule.labels(splits["x_train"])
  assert y.shape == (1200, 1) and y.dtype == np.int32
  counts = np.bincount(y[:, 0], minlength=3)
  for k, e in enumerate(q):  # #{ink < e} ≤ (k + 1)·400 ≤ #{ink ≤ e}
    assert np.sum(v < e) <= 400 * (k + 1) <= np.sum(v <= e) == counts[:k + 1].sum()
  assert counts.tolist() == [406, 407, 387]


def test_multitask_rule_and_serialisation(splits):
  rule = digits_data.make_label_rule("multitask", splits["x_train"])
  assert rule.names == ("ink2", "edge2") and rule.classes == (2, 2)
  assert digits_data.task_names("ink") == ("ink3",) and digits_data.task_classes("ink") == (3,)
  y = rule.labels(splits["x_train"])
  assert y.shape == (1200, 2)
  np.testing.assert_array_equal(y[:, 0], digits_data.ink(splits["x_train"]) >
                                np.median(digits_data.ink(splits["x_train"])))
  np.testing.assert_array_equal(y[:, 1], digits_data.edge(splits["x_train"]) >
                                np.median(digits_data.edge(splits["x_train"])))
  assert abs(y[:, 1].sum() - 600) <= 1
  # jitted on jax arrays = numpy, on both splits.
  for x in (splits["x_train"], splits["x_heldout"]):
    np.testing.assert_array_equal(np.asarray(jax.jit(rule.labels)(jnp.asarray(x))),
                                  rule.labels(x))
  back = digits_data.LabelRule.from_dict(json.loads(json.dumps(rule.to_dict())))
  assert back == rule
  with pytest.raises(ValueError):
    digits_data.make_label_rule("nope", splits["x_train"])


def test_sample_label_pairs(splits):
  rule = digits_data.make_label_rule("multitask", splits["x_train"])
  x, y = digits_data.sample_label_pairs(splits["x_train"], rule, 300, seed=0)
  assert x.shape == (300, 8, 8) and y.shape == (300, 2)
  np.testing.assert_array_equal(y, rule.labels(x))
  assert len(np.unique(x.reshape(300, -1), axis=0)) == 300  # the train images are distinct
  flat_train = {img.tobytes() for img in splits["x_train"]}
  assert all(img.tobytes() in flat_train for img in x)
  x2, y2 = digits_data.sample_label_pairs(splits["x_train"], rule, 300, seed=0)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  x3, _ = digits_data.sample_label_pairs(splits["x_train"], rule, 300, seed=1)
  assert not np.array_equal(x, x3)


def test_ink3_classifier_accuracy_and_calibration(splits, ink3_fit):
  rule, model, params, info = ink3_fit
  assert model.num_classes == 3 and not model.neighbour_diffs
  t = float(params["params"]["temperature"])
  assert t == pytest.approx(info["temperature"])
  logits = np.asarray(model.apply(params, jnp.asarray(splits["x_heldout"])))
  assert logits.shape == (597, 3)
  y = rule.labels(splits["x_heldout"])[:, 0]
  acc = float((logits.argmax(-1) == y).mean())
  probs_after = np.asarray(jax.nn.softmax(logits))
  probs_before = np.asarray(jax.nn.softmax(logits * t))  # temperature 1
  ece_before = calibration.expected_calibration_error(probs_before, y)
  ece_after = calibration.expected_calibration_error(probs_after, y)
  print(f"\nink3: held-out acc {acc:.4f}, ECE {ece_before:.4f} → {ece_after:.4f}, {info}")
  assert acc >= 0.95
  assert info["calib_nll_after"] <= info["calib_nll_before"]
  assert ece_after <= ece_before + 0.01
  assert info["num_fit"] == 240 and info["num_calib"] == 60
  assert info["train_acc"] >= 0.95
  json.dumps(info)


def test_classifier_is_deterministic(splits):
  rule = digits_data.make_label_rule("multitask", splits["x_train"])
  x, y = digits_data.sample_label_pairs(splits["x_train"], rule, 100, seed=3)
  fits = [digits_data.fit_classifier(x, y[:, 1], 2, seed=3, steps=30, batch=32)[0]
          for _ in range(2)]
  for a, b in zip(jax.tree.leaves(fits[0]), jax.tree.leaves(fits[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = digits_data.fit_classifier(x, y[:, 1], 2, seed=4, steps=30, batch=32)[0]
  assert not np.array_equal(np.asarray(other["params"]["Dense_0"]["kernel"]),
                            np.asarray(fits[0]["params"]["Dense_0"]["kernel"]))
  assert fits[0]["params"]["Dense_0"]["kernel"].shape == (3, 32)  # x, Δ²→right, Δ²↓down


def test_fit_temperature_never_increases_nll():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(50, 3)) * 4
  labels = rng.integers(0, 3, 50)
  t, before, after = calibration.fit_temperature(logits, labels)
  assert after <= before and t > 1  # random labels: confident logits get softened
  correct = np.eye(3)[labels] * 2.0  # all correct, underconfident: sharpened, but not to 0
  t, before, after = calibration.fit_temperature(correct, labels)
  assert after <= before and np.exp(calibration.LOG_T_RANGE[0]) < t < 1


def test_expected_calibration_error():
  labels = np.array([0, 0, 0, 1])
  probs = np.array([[0.75, 0.25]] * 4)  # one bin, conf 0.75, acc 0.75
  assert calibration.expected_calibration_error(probs, labels) == pytest.approx(0.0)
  probs = np.array([[0.95, 0.05]] * 2 + [[0.4, 0.6]] * 2)
  labels = np.array([0, 1, 1, 0])  # bin (0.9, 1]: conf .95 acc .5; bin (.5, .6]: conf .6 acc .5
  want = 0.5 * 0.45 + 0.5 * 0.1
  assert calibration.expected_calibration_error(probs, labels) == pytest.approx(want)


def test_digit_judge(splits, judge):
  acc = float((judge.predict(splits["x_heldout"]) == splits["c_heldout"]).mean())
  print(f"\njudge held-out accuracy {acc:.4f}")
  assert acc >= 0.96
  feats = judge.features(splits["x_heldout"])
  assert feats.shape == (597, 32)
  out_of_range = splits["x_heldout"][:20] * 1.4 - 0.2
  np.testing.assert_array_equal(judge.predict(out_of_range),
                                judge.predict(np.clip(out_of_range, 0, 1)))
  again = digits_data.fit_digit_judge(splits["x_train"], splits["c_train"], seed=0)
  np.testing.assert_array_equal(again.features(splits["x_heldout"]), feats)


def test_frechet_distance(splits, judge):
  f_train = judge.features(splits["x_train"])
  f_held = judge.features(splits["x_heldout"])
  noise = np.random.default_rng(0).uniform(0, 1, (597, 8, 8))
  f_noise = judge.features(noise)
  assert abs(digits_data.frechet_distance(f_train, f_train)) < 1e-6
  ref = digits_data.frechet_distance(f_train, f_held)
  far = digits_data.frechet_distance(f_train, f_noise)
  print(f"\nFréchet train-vs-heldout {ref:.4f}, train-vs-noise {far:.4f}")
  assert 0 < ref < 1.0 and far > 10 * ref
  # 1-D Gaussians: (μa − μb)² + (σa − σb)².
  a, b = np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])
  want = (1.0 - 3.0) ** 2 + (np.std(a, ddof=1) - np.std(b, ddof=1)) ** 2
  assert digits_data.frechet_distance(a, b) == pytest.approx(want)


def test_per_digit_rule_labels_each_digit_at_its_own_median(splits):
  """inkc2: class 1 iff ink > the median ink of the image's own digit class (train split)."""
  rule = digits_data.make_label_rule("inkc", splits["x_train"], splits["c_train"])
  assert rule.per_digit and digits_data.LabelRule.from_dict(json.loads(json.dumps(
      rule.to_dict()))) == rule
  ink = digits_data.ink(splits["x_train"])
  y = rule.labels(splits["x_train"], splits["c_train"])[:, 0]
  for d in range(10):
    m = splits["c_train"] == d
    assert rule.edges[0][d][0] == pytest.approx(float(np.median(ink[m])), abs=1e-6)
    assert abs(y[m].mean() - 0.5) < 0.02  # about half of every digit is above its median
  # the same image gets different labels under different digits (y depends on c)
  medians = np.asarray(rule.edges[0])[:, 0]
  i = int(np.argmin(np.abs(ink - np.median(medians))))  # between the digits' medians
  x = splits["x_train"][i:i + 1].repeat(10, 0)
  assert len(set(rule.labels(x, np.arange(10))[:, 0].tolist())) == 2
  assert np.array_equal(np.asarray(rule.labels(jnp.asarray(x), jnp.arange(10))),
                        rule.labels(x, np.arange(10)))
  with pytest.raises(ValueError, match="pass c"):
    rule.labels(splits["x_train"])
  with pytest.raises(ValueError, match="c_train"):
    digits_data.make_label_rule("inkc", splits["x_train"])


def test_digit_aware_classifier_beats_the_blind_one_on_a_digit_dependent_label(splits):
  """Same 300 pairs; p̂(y | x, c) knows the per-digit edge, p̂(y | x) must guess it from x."""
  from ctrl_jax.core import rewards  # pylint: disable=g-import-not-at-top
  rule = digits_data.make_label_rule("inkc", splits["x_train"], splits["c_train"])
  idx = digits_data.label_pair_indices(len(splits["x_train"]), 300, 0)
  x, c = splits["x_train"][idx], splits["c_train"][idx]
  y = rule.labels(x, c)[:, 0]
  y_held = rule.labels(splits["x_heldout"], splits["c_heldout"])[:, 0]
  acc = {}
  for aware in (False, True):
    model = digits_data.classifier_for("inkc2", use_digit=aware)
    params, _ = digits_data.fit_classifier(x, y, 2, seed=0, steps=500,
                                      neighbour_diffs=model.neighbour_diffs,
                                      cond=c if aware else None)
    args = (jnp.asarray(splits["c_heldout"]),) if aware else ()
    pred = np.asarray(model.apply(params, jnp.asarray(splits["x_heldout"]), *args)).argmax(-1)
    acc[aware] = float((pred == y_held).mean())
    reward_fn = rewards.make_reward_fn([model.apply], [1.0], takes_prompt=[aware])
    r, aux = reward_fn([params], jnp.asarray(splits["x_heldout"][:8]),
                       jnp.asarray(y_held[:8, None]), jnp.asarray(splits["c_heldout"][:8]))
    assert r.shape == (8,) and np.allclose(np.exp(np.asarray(r)),
                                           np.asarray(aux["probs"][0])[np.arange(8), y_held[:8]],
                                           atol=1e-5)
    if aware:
      with pytest.raises(ValueError, match="must pass prompt"):
        reward_fn([params], jnp.asarray(splits["x_heldout"][:8]), jnp.asarray(y_held[:8, None]))
  assert acc[True] > acc[False] + 0.03, acc
  assert acc[True] > 0.95, acc
