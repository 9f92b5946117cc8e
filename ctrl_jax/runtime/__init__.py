"""What runs a stage but is not the method: the training loop, checkpoints, progress and
scalars, device meshes, a stage's files, huge pages and background compilation. Imports
nothing else of ctrl_jax."""
