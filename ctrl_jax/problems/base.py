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

import jax
import ml_collections
import numpy as np

from ctrl_jax.core import generate
from ctrl_jax.core import train
from ctrl_jax.runtime import sharding as shd


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


@dataclasses.dataclass
class Preview:
  """A fixed grid of requests sampled from the current params during training and logged as a
  TensorBoard image ("samples/grid"): same requests, same noise every time, so a change in the
  grid is a change of the model (e.g. reward hacking under way).

  Attributes:
    prompt: int [N], the conditions c (rows of `frozen["contexts"]`).
    y: int [N, T], the asked labels.
    to_grid: decoded images [N, ...] (numpy, as `setup.decode_fn` returns them) → uint8
      [H, W, 3], the picture.
    seed: x_T / noise seed (fixed: independent of the update).
    frozen: frozen inputs replacing the train step's (e.g. "contexts" of other prompts).
  """
  prompt: np.ndarray
  y: np.ndarray
  to_grid: Callable[[np.ndarray], np.ndarray]
  seed: int = 0
  frozen: dict = dataclasses.field(default_factory=dict)

  def renderer(self, setup: train.CtrlSetup, frozen: dict, mesh) -> Callable[[dict], np.ndarray]:
    """`render(params) -> uint8 [H, W, 3]`: the requests sampled with `frozen` (the train
    step's frozen inputs, "hparams" included, as placed on `mesh`) over the mesh, the images
    replicated so that every process may call it (it must: it is one jitted program over the
    global mesh) and process 0 can write them. Compiled on the first call."""
    n = len(self.prompt)
    rows = -(-n // shd.batch_shards(mesh)) * shd.batch_shards(mesh)
    pad = np.arange(rows) % n  # a batch that splits over the mesh; the copies are dropped
    data, repl = shd.data_sharded(mesh), shd.replicated(mesh)
    inputs = (shd.put(np.asarray(self.prompt, np.int32)[pad], data),
              shd.put(np.asarray(self.y, np.int32)[pad], data),
              shd.put(jax.random.key(self.seed), repl))
    frozen = {**frozen, **shd.put(self.frozen, repl)}
    fn = generate.sample_fn(setup)
    # params, frozen: committed where the train step keeps them; out: replicated
    sample = jax.jit(fn) if mesh.devices.size == 1 else jax.jit(fn, out_shardings=repl)

    def render(params: dict) -> np.ndarray:
      c, y, key = inputs
      # every process holds the whole (replicated) output: its first local copy
      return self.to_grid(np.asarray(sample(params, frozen, c, y, key).addressable_data(0))[:n])

    return render


def image_grid(images: np.ndarray, rows: int, cols: int, scale: int = 1,
               pad: int = 2) -> np.ndarray:
  """uint8 images [rows · cols, h, w, 3] (row-major) → one uint8 picture [H, W, 3] with white
  `pad`-pixel gaps, every image enlarged `scale`× (nearest)."""
  images = np.asarray(images, np.uint8)
  if scale > 1:
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  h, w = images.shape[1:3]
  canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
  for i, img in enumerate(images[:rows * cols]):
    r, c = divmod(i, cols)
    canvas[pad + r * (h + pad):pad + r * (h + pad) + h,
           pad + c * (w + pad):pad + c * (w + pad) + w] = img
  return canvas


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
    preview: `preview(config, problem) -> Preview`: the grid logged to TensorBoard every
      config.tb_image_every updates (`experiment.finetune`).
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
  preview: Optional[Callable[[Config, Problem], Preview]] = None
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
