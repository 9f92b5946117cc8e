"""ctrl_jax: CTRL (arXiv 2406.12120) in pure JAX.

Modules, one per concept:
  schedules   noise schedules and DDIM timestep spacing
  sampling    DDIM step, guided ε, the side-by-side CTRL trajectory with per-step KL
  objective   path KL conventions, reward, the CTRL loss
  train       optimiser, train state, the jitted train step
  sharding    device meshes and shardings
  checkpoint  orbax checkpoints
  experiment  the fine-tuning loop (resume, logging, checkpoints)
  digits      the sklearn-digits problem: splits, label rules, reward classifier, judges
  models/     everything that touches diffusers / transformers (augmented UNet, LoRA)
"""
__version__ = "0.1.0"
