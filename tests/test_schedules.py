"""Parity of `ctrl_jax.core.schedules` with PyTorch diffusers' DDIMScheduler, plus input
validation."""
import importlib.util

import diffusers
import numpy as np
import pytest

from ctrl_jax.core.schedules import ddim_timesteps, make_schedule

# diffusers' DDIMScheduler is PyTorch: only the parity tests need torch.
requires_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                    reason="needs torch (the test extra)")

# (beta_schedule, beta_start, beta_end): DDPM's linear defaults, SD1.5's scaled-linear, cosine.
SCHEDULES = [
    ("linear", 1e-4, 0.02),
    ("scaled_linear", 0.00085, 0.012),
    ("squaredcos_cap_v2", 0.0001, 0.02),  # β range unused by the cosine schedule.
]


def _torch_scheduler(beta_schedule, beta_start, beta_end, **kwargs):
  return diffusers.DDIMScheduler(beta_schedule=beta_schedule, beta_start=beta_start,
                                 beta_end=beta_end, num_train_timesteps=1000,
                                 set_alpha_to_one=False, **kwargs)


@requires_torch
@pytest.mark.parametrize("beta_schedule,beta_start,beta_end", SCHEDULES)
def test_schedule_matches_diffusers(beta_schedule, beta_start, beta_end):
  """β, ᾱ and the final ᾱ match diffusers' DDIMScheduler, so sampling uses SD's exact chain."""
  ours = make_schedule(beta_schedule, beta_start, beta_end, num_train_timesteps=1000,
                       set_alpha_to_one=False)
  ref = _torch_scheduler(beta_schedule, beta_start, beta_end)
  betas, acp = np.asarray(ours.betas), np.asarray(ours.alphas_cumprod)
  ref_betas, ref_acp = ref.betas.numpy(), ref.alphas_cumprod.numpy()
  assert betas.shape == ref_betas.shape == (1000,)
  assert acp.shape == ref_acp.shape == (1000,)
  assert betas.dtype == np.float32 and acp.dtype == np.float32
  err_b = np.max(np.abs(betas - ref_betas))
  err_a = np.max(np.abs(acp - ref_acp))
  print(f"\n[{beta_schedule}] max|Δβ|={err_b:.3e} max|Δᾱ|={err_a:.3e}")
  assert err_b <= 1e-6
  assert err_a <= 1e-6
  assert ours.num_train_timesteps == 1000
  # set_alpha_to_one=False: the step past t=0 uses ᾱ_0, same as diffusers.
  assert float(ours.final_alpha_cumprod) == float(ref.final_alpha_cumprod)
  assert float(ours.final_alpha_cumprod) == float(acp[0])


def test_set_alpha_to_one_gives_final_one():
  """`set_alpha_to_one=True` makes the step past t=0 deterministic (ᾱ_final = 1)."""
  assert float(make_schedule(set_alpha_to_one=True).final_alpha_cumprod) == 1.0


def test_ddim_timesteps_sd_50_steps_exact():
  """50 "leading" steps with steps_offset=1 are exactly SD's [981, 961, …, 1]."""
  ts = ddim_timesteps(1000, 50)
  assert ts.dtype == np.int32
  np.testing.assert_array_equal(ts, np.arange(981, 0, -20))
  assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50


@requires_torch
@pytest.mark.parametrize("num_steps", [10, 25, 50])
def test_ddim_timesteps_match_diffusers(num_steps):
  """Same timesteps as diffusers' leading spacing with steps_offset=1 (SD1.5's config)."""
  ref = _torch_scheduler("scaled_linear", 0.00085, 0.012, steps_offset=1,
                         timestep_spacing="leading")
  ref.set_timesteps(num_steps)
  np.testing.assert_array_equal(ddim_timesteps(1000, num_steps), ref.timesteps.numpy())


def test_unknown_beta_schedule_raises():
  """An unknown schedule name is rejected with a message naming `beta_schedule`."""
  with pytest.raises(ValueError, match="beta_schedule"):
    make_schedule("cosine_typo")


@pytest.mark.parametrize("num_steps", [0, 1001])
def test_bad_num_inference_steps_raises(num_steps):
  """0 steps or more steps than training timesteps is rejected naming `num_inference_steps`."""
  with pytest.raises(ValueError, match="num_inference_steps"):
    ddim_timesteps(1000, num_steps)
