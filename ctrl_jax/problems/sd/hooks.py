"""The Stable Diffusion problem as `config.problem = "sd"` (see `ctrl_jax.problems.base`)."""
from ctrl_jax.problems import base
from ctrl_jax.problems.sd import evaluation
from ctrl_jax.problems.sd import export
from ctrl_jax.problems.sd import stages

HOOKS = base.ProblemHooks(
    build=stages.build_problem,
    fit_classifier=stages.ensure_classifiers,
    evaluate=evaluation.evaluate,
    export=export.export,
    validate=stages.validate,
)
