"""CTRL problems behind one protocol (`base.ProblemHooks`, found by name with `base.get`):
`digits/` (the benchmark on sklearn's 8×8 digits), `sd/` (Stable Diffusion 1.5) and `tiny`
(a random problem for tests and the smoke job)."""
