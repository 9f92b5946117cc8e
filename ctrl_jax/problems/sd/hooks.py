"""The Stable Diffusion problem as `config.problem = "sd"` (see `ctrl_jax.problems.base`)."""
import os

import ml_collections
import numpy as np

from ctrl_jax.models import sd as sd_lib
from ctrl_jax.problems import base
from ctrl_jax.problems.sd import compressibility
from ctrl_jax.problems.sd import evaluation
from ctrl_jax.problems.sd import export
from ctrl_jax.problems.sd import stages
from ctrl_jax.runtime import fs
from ctrl_jax.runtime import stage

# Evaluation prompts in the training preview (rows of the grid).
PREVIEW_PROMPTS = 4


def preview(config: ml_collections.ConfigDict, problem: base.Problem) -> base.Preview:
  """The training preview: one sample per (evaluation prompt, label) cell, rows = the first
  `PREVIEW_PROMPTS` evaluation prompts, columns = labels, the evaluation's seed; images under
  64 px are enlarged (nearest) to about 64."""
  ls = problem.setup.label_space
  prompts = list(config.eval.prompts)[:PREVIEW_PROMPTS]
  prompt, y = evaluation.eval_requests(len(prompts), ls.num_labels, 1, ls)
  contexts = sd_lib.encode_prompts(problem.info["sd"], prompts)

  def to_grid(images: np.ndarray) -> np.ndarray:  # [N, 3, H, W] in [-1, 1]
    u8 = compressibility.to_uint8(images)
    return base.image_grid(u8, len(prompts), ls.num_labels,
                           scale=max(1, 64 // u8.shape[1]))

  return base.Preview(prompt=prompt, y=y, to_grid=to_grid, seed=int(config.eval.seed),
                      frozen={"contexts": np.asarray(contexts)})


def validate(config: ml_collections.ConfigDict) -> None:
  """`stages.validate`, and the LAION model the evaluation scores every image with
  (config.eval.laion_score) for tasks whose classifier stage does not load it already."""
  stages.validate(config)
  k = config.classifier
  if (config.eval.get("laion_score", False) and "aesthetic" not in stages.TASKS[config.task][0]
      and k.clip_model != "tiny" and not os.path.isfile(os.path.expanduser(k.laion_weights))):
    raise FileNotFoundError(
        f"config.classifier.laion_weights={k.laion_weights!r} is not a file; the evaluation "
        "scores every image with the LAION aesthetic predictor (config.eval.laion_score): "
        "give the path of `sac+logos+ava1-l14-linearMSE.pth` (or a safetensors copy), or set "
        "--config.eval.laion_score=False.")


def _recording_classifier_stage(fn):
  """`fn(config, workdir, ...)` that first records the classifier stage's run
  (DIR/run_info/classifier.json) when the stage is still to be fitted."""

  def wrapped(config, workdir, *args, **kwargs):
    if not fs.exists(fs.join(workdir, "classifier", "info.json")):
      stage.record_run(workdir, "classifier", config)
    return fn(config, workdir, *args, **kwargs)

  wrapped.__doc__ = fn.__doc__
  return wrapped


HOOKS = base.ProblemHooks(
    build=_recording_classifier_stage(stages.build_problem),
    fit_classifier=_recording_classifier_stage(stages.ensure_classifiers),
    evaluate=evaluation.evaluate,
    export=export.export,
    validate=validate,
    preview=preview,
)
