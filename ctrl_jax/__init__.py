"""ctrl_jax: CTRL (arXiv 2406.12120) in pure JAX.

Layers, bottom up; an import never points up (tests/test_layers.py):
  runtime/    loop, checkpoints, progress and scalars, meshes, huge pages, background compile
  models/     networks and weights I/O: everything that touches diffusers / transformers
  core/       the method as pure functions: schedules, DDIM trajectory + path KL, objective,
              rewards, calibration, sampling p(x | c, y), the train step
  problems/   the problem protocol and registry; digits, Stable Diffusion, tiny
  experiment  fine-tuning and evaluation through the problem protocol; export
  baselines/  guidance methods, CFG on triplets, the comparison and the studies
  launch/     absl mains
"""
__version__ = "0.1.0"
