"""The digits problem as `config.problem = "digits"` (see `ctrl_jax.problems.base`)."""
import ml_collections
import numpy as np

from ctrl_jax.problems import base
from ctrl_jax.problems.digits import evaluation
from ctrl_jax.problems.digits import export
from ctrl_jax.problems.digits import stages


def preview(config: ml_collections.ConfigDict, problem: base.Problem) -> base.Preview:
  """The training preview: one sample per (digit c, label) cell, rows = digits 0–9, columns =
  labels, each image 4× (32 × 32), the evaluation's seed."""
  ls = problem.setup.label_space
  c, y = evaluation.eval_requests(ls, 1)

  def to_grid(images: np.ndarray) -> np.ndarray:  # [N, 8, 8] in [0, 1]
    gray = np.clip(np.round(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return base.image_grid(np.repeat(gray[..., None], 3, axis=-1), 10, ls.num_labels, scale=4)

  return base.Preview(prompt=c, y=y, to_grid=to_grid, seed=int(config.eval.seed))


HOOKS = base.ProblemHooks(
    build=stages.build_problem,
    abstract=stages.abstract_problem,
    pretrain=stages.ensure_pretrained,
    fit_classifier=stages.ensure_classifiers,
    evaluate=evaluation.evaluate,
    export=export.export,
    validate=stages.validate,
    preview=preview,
    required_stages=("pretrain", "classifier"),
)
