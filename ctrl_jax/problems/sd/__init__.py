"""CTRL on Stable Diffusion 1.5: the classifier stage and CTRL problem (`stages`), the aesthetic
and compressibility classifiers (`aesthetic`, `compressibility`), evaluation with the ground
truths (`evaluation`) and export (`export`); `hooks` plugs them into `ctrl_jax.problems.base`."""
