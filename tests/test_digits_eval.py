"""Evaluation pieces of the digits benchmark on real digits with known answers."""
import json

import numpy as np
import pytest

from ctrl_jax.problems.digits import data as digits_data
from ctrl_jax.problems.digits import evaluation as digits_eval
from ctrl_jax.problems.digits import plots as digits_plots
from ctrl_jax.problems.digits import stages as digits_stages


@pytest.fixture(scope="module")
def heldout():
  splits = digits_data.load_splits()
  judge = digits_data.fit_digit_judge(splits["x_train"], splits["c_train"])
  return splits, judge


@pytest.mark.parametrize("task", ["ink", "multitask"])
def test_eval_requests_cover_every_cell_equally(task):
  ls = digits_stages.label_space(task)
  c, y = digits_eval.eval_requests(ls, 5)
  assert y.shape == (10 * ls.num_labels * 5, ls.num_tasks)
  cells = c * ls.num_labels + np.asarray(ls.encode(y))
  assert (np.bincount(cells, minlength=10 * ls.num_labels) == 5).all()


@pytest.mark.parametrize("task", ["ink", "multitask"])
def test_score_of_real_digits_with_their_true_labels(heldout, task):
  """Held-out digits asked for their own (c, y): y-accuracy 1, digit accuracy = the judge's,
  Fréchet distance to themselves ≈ 0; asked for a wrong class: y-accuracy 0."""
  splits, judge = heldout
  x, c = splits["x_heldout"], splits["c_heldout"]
  rule = digits_data.make_label_rule(task, splits["x_train"])
  ls = digits_stages.label_space(task)
  y = np.asarray(rule.labels(x))
  m = digits_eval.score(x, c, y, rule, judge, judge.features(x), ls)
  assert m["joint_accuracy"] == 1.0
  for name in rule.names:
    assert m["tasks"][name]["accuracy"] == 1.0 and m["tasks"][name]["macro_f1"] == 1.0
  assert m["digit_accuracy"] == pytest.approx(float((judge.predict(x) == c).mean()))
  assert abs(m["frechet_distance"]) < 1e-6
  table = np.asarray(m["cell_accuracy"])
  assert table.shape == (10, ls.num_labels) and table.max() == 1.0
  wrong = y.copy()
  wrong[:, 0] = (wrong[:, 0] + 1) % ls.task_classes[0]
  m_wrong = digits_eval.score(x, c, wrong, rule, judge, judge.features(x), ls)
  assert m_wrong["tasks"][rule.names[0]]["accuracy"] == 0.0
  assert m_wrong["joint_accuracy"] == 0.0


def test_tile_cells_places_each_cell_sample_in_its_row_and_column():
  images = np.zeros((10 * 3 * 2, 8, 8), np.float32)
  c = np.repeat(np.arange(10), 6)
  label = np.tile(np.repeat(np.arange(3), 2), 10)
  images[(c == 7) & (label == 2)] = 1.0  # only cell (7, 2) is white
  mosaic = digits_plots.tile_cells(images, c, label, 3, per_cell=2)
  s, cell_w = 9, 2 * 9 + 1
  assert mosaic.shape == (10 * s + 1, 3 * cell_w + 1)
  block = mosaic[7 * s + 1:7 * s + 9, 2 * cell_w + 1:2 * cell_w + 9]
  assert (block == 1.0).all()
  assert (mosaic[1:9, 1:9] == 0.0).all()  # cell (0, 0) first sample


def test_run_comparison_plots_every_run_and_names_a_bad_log(tmp_path):
  logs = {}
  for name, scale in (("a", 1.0), ("b", 2.0)):
    logs[name] = str(tmp_path / f"{name}.jsonl")
    with open(logs[name], "w") as f:
      for step in (1, 5, 10):
        f.write(json.dumps({"step": step, "reward": -scale / step, "kl": scale * step,
                            "grad_norm": scale}) + "\n")
  out = str(tmp_path / "runs.png")
  digits_plots.save_run_comparison(out, logs)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(out) as im:
    assert im.size[0] > 2 * im.size[1]  # three panels side by side
  with pytest.raises(FileNotFoundError, match="run 'c'"):
    digits_plots.save_run_comparison(out, {"c": str(tmp_path / "absent.jsonl")})
  with pytest.raises(KeyError, match="'entropy'"):
    digits_plots.save_run_comparison(out, logs, keys=("reward", "entropy"))
