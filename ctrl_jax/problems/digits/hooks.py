"""The digits problem as `config.problem = "digits"` (see `ctrl_jax.problems.base`)."""
from ctrl_jax.problems import base
from ctrl_jax.problems.digits import evaluation
from ctrl_jax.problems.digits import export
from ctrl_jax.problems.digits import stages

HOOKS = base.ProblemHooks(
    build=stages.build_problem,
    abstract=stages.abstract_problem,
    pretrain=stages.ensure_pretrained,
    fit_classifier=stages.ensure_classifiers,
    evaluate=evaluation.evaluate,
    export=export.export,
    validate=stages.validate,
    required_stages=("pretrain", "classifier"),
)
