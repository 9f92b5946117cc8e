"""The reward log p̂(y | x): the official log(p̂ + 1e-6) and the log-softmax form (log_eps = 0),
against closed forms of a linear classifier in float64 numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctrl_jax.core import rewards


def _linear(seed: int = 0, d: int = 6, k: int = 3):
  w = np.random.default_rng(seed).normal(size=(d, k)) * 3.0
  return w, (lambda params, x: x @ params)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("log_eps", [1e-6, 0.0])
def test_reward_values_match_closed_form(log_eps):
  w, apply = _linear()
  x = np.random.default_rng(1).normal(size=(16, 6))
  y = np.random.default_rng(2).integers(0, 3, size=(16, 1))
  reward_fn = rewards.make_reward_fn([apply], [2.0], log_eps=log_eps)
  r, aux = reward_fn([jnp.asarray(w, jnp.float32)], jnp.asarray(x, jnp.float32), jnp.asarray(y))
  logp = _log_softmax(x @ w)[np.arange(16), y[:, 0]]
  want = np.log(np.exp(logp) + log_eps) if log_eps else logp
  np.testing.assert_allclose(np.asarray(r), 2.0 * want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(aux["log_prob"][0]), want, rtol=1e-5, atol=1e-5)


def test_log_softmax_reward_keeps_the_gradient_of_a_confidently_wrong_sample():
  """d/dx log p̂(y | x) = W_y − Σ_k p_k W_k (closed form). For a sample the classifier puts in
  another class with p̂(y | x) ≈ 1e-13, log_eps = 0 gives that gradient; log(p̂ + 1e-6) scales
  it by p̂ / (p̂ + 1e-6) ≈ 1e-7: no signal."""
  w, apply = _linear()
  x = (w[:, 0] - w[:, 1]) * 2.0  # firmly class 0 …
  y = 1                          # … asked for class 1
  z = x @ w
  p = np.exp(_log_softmax(z))
  assert p[y] < 1e-10, p
  want = w[:, y] - w @ p
  grads = {}
  for eps in (0.0, 1e-6):
    fn = rewards.make_reward_fn([apply], [1.0], log_eps=eps)
    g = jax.grad(lambda xx, fn=fn: fn([jnp.asarray(w, jnp.float32)], xx[None],
                                      jnp.asarray([[y]]))[0][0])(jnp.asarray(x, jnp.float32))
    grads[eps] = np.asarray(g, np.float64)
  np.testing.assert_allclose(grads[0.0], want, rtol=1e-4, atol=1e-4)
  assert np.linalg.norm(grads[1e-6]) < 1e-5 * np.linalg.norm(want)


def test_negative_log_eps_is_refused():
  _, apply = _linear()
  with pytest.raises(ValueError, match="log_eps"):
    rewards.make_reward_fn([apply], [1.0], log_eps=-1.0)
