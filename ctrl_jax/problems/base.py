"""What a CTRL problem is, and the registry that finds one by name (`config.problem`).

A problem supplies the pre-trained model, the reward classifier(s) and the condition table a
CTRL run trains on, and owns what only it knows how to do: its earlier stages, its evaluation
and its export. `ctrl_jax.experiment` and `ctrl_jax.export` reach it only through
`ProblemHooks`, and the registry maps names to import paths resolved on first use, so nothing
here (and nothing below `problems/`) imports a problem.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

import ml_collections

from ctrl_jax.core import train


@dataclasses.dataclass
class Problem:
  """A CTRL problem ready to train.

  Attributes:
    setup: static description (model, reward, trajectory options).
    frozen: frozen inputs of the train step except "hparams" (UNet, reward, decoder params,
      contexts [P, L, D], uncond_context [L, D], schedule).
    params: initial trainable parameters.
    num_prompts: P, the number of conditions c to draw from.
    info: what the builder's earlier stages reported (e.g. classifier metrics).
  """
  setup: train.CtrlSetup
  frozen: dict
  params: dict
  num_prompts: int
  info: dict = dataclasses.field(default_factory=dict)


Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class ProblemHooks:
  """The entry points of a problem. Only `build` is required.

  Attributes:
    build: `build(config, workdir) -> Problem`: runs the missing earlier stages and returns the
      problem. With `abstract` set it also takes `setup=` (from `abstract(config).setup`, used
      as is) and `on_running=` (called once, when its slow work is under way: the moment to
      start compiling the train step).
    abstract: `abstract(config) -> Problem` with `jax.ShapeDtypeStruct` frozen inputs and params,
      from the config alone: lets the train step compile while the earlier stages run.
    pretrain: `pretrain(config, workdir)`: the base-model stage, for problems that train one.
    fit_classifier: `fit_classifier(config, workdir)`: the reward-classifier stage.
    evaluate: `evaluate(config, workdir, problem, params) -> metrics`: writes DIR/eval/.
    export: `export(config, workdir, out, problem, params, step, lora_only) -> dict`: writes a
      PyTorch diffusers folder into the empty folder `out`.
    validate: `validate(config)`: checks the problem's own fields (and paths) before any work;
      raises ValueError / FileNotFoundError naming the field.
    required_stages: stage folders of DIR whose `info.json` must exist before an export or an
      evaluation (otherwise `build` would run them, e.g. pre-train, instead of failing fast).
  """
  build: Callable[..., Problem]
  abstract: Optional[Callable[[Config], Problem]] = None
  pretrain: Optional[Callable[[Config, str], Any]] = None
  fit_classifier: Optional[Callable[[Config, str], Any]] = None
  evaluate: Optional[Callable[..., dict]] = None
  export: Optional[Callable[..., dict]] = None
  validate: Optional[Callable[[Config], None]] = None
  required_stages: tuple[str, ...] = ()


# name → import path of a module with a module-level `HOOKS: ProblemHooks`.
_REGISTRY: dict[str, str | ProblemHooks] = {
    "tiny": "ctrl_jax.problems.tiny",
    "digits": "ctrl_jax.problems.digits.hooks",
    "sd": "ctrl_jax.problems.sd.hooks",
}


def register(name: str, hooks: str | ProblemHooks) -> None:
  """Adds a problem: its `ProblemHooks`, or the import path of a module defining `HOOKS`."""
  _REGISTRY[name] = hooks


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> ProblemHooks:
  """The hooks of problem `name` (imports its module on first use)."""
  if name not in _REGISTRY:
    raise ValueError(f"config.problem={name!r}; expected one of {names()}.")
  hooks = _REGISTRY[name]
  if isinstance(hooks, str):
    hooks = importlib.import_module(hooks).HOOKS
    _REGISTRY[name] = hooks
  return hooks


def hook(name: str, what: str) -> Callable[..., Any]:
  """`get(name).<what>`, or a one-line error naming the problems that have it."""
  fn = getattr(get(name), what)
  if fn is None:
    have = [n for n in names() if getattr(get(n), what) is not None]
    raise ValueError(f"config.problem={name!r} has no {what.replace('_', ' ')} stage; "
                     f"problems with one: {have}.")
  return fn
