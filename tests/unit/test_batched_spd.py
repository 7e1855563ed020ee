"""hiermeta.batched_spd against NumPy's dense linear algebra and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from hiermeta.batched_spd import quad_logdet, spd_inverse_logdet, trace_solve_logdet


def spd(rng, n, P):
    A = rng.normal(size=(n, P, P))
    return A @ np.swapaxes(A, 1, 2) + 0.5 * np.eye(P)


def test_inverse_and_log_determinant_equal_numpy():
    rng = np.random.default_rng(0)
    B = spd(rng, 6, 5)
    inverse, log_det = spd_inverse_logdet(jnp.asarray(B))
    np.testing.assert_allclose(inverse, np.linalg.inv(B), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(log_det, np.linalg.slogdet(B)[1], rtol=1e-12)


def test_quadratic_form_and_trace_equal_numpy():
    rng = np.random.default_rng(1)
    B, c = spd(rng, 4, 3), rng.normal(size=(4, 3))
    C = rng.normal(size=(4, 3, 2))
    S = C @ np.swapaxes(C, 1, 2)
    q, log_det = quad_logdet(jnp.asarray(B), jnp.asarray(c))
    np.testing.assert_allclose(q, np.einsum("np,np->n", c, np.linalg.solve(B, c[..., None])[..., 0]), rtol=1e-12)
    np.testing.assert_allclose(log_det, np.linalg.slogdet(B)[1], rtol=1e-12)
    trace, _ = trace_solve_logdet(jnp.asarray(B), jnp.asarray(S))
    np.testing.assert_allclose(trace, np.trace(np.linalg.solve(B, S), axis1=1, axis2=2), rtol=1e-12)


def test_derivatives_equal_finite_differences_to_second_order():
    rng = np.random.default_rng(2)
    B, c = jnp.asarray(spd(rng, 3, 3)), jnp.asarray(rng.normal(size=(3, 3)))
    C = rng.normal(size=(3, 3, 3))
    S = jnp.asarray(C @ np.swapaxes(C, 1, 2))
    check_grads(quad_logdet, (B, c), order=2, modes=("fwd", "rev"), eps=1e-5)
    check_grads(trace_solve_logdet, (B, S), order=2, modes=("fwd", "rev"), eps=1e-5)


def test_gradient_of_the_log_determinant_is_the_inverse():
    """d log|B| / dB = B^-T, a closed form."""
    rng = np.random.default_rng(3)
    B = jnp.asarray(spd(rng, 2, 4))
    grad = jax.grad(lambda B: jnp.sum(quad_logdet(B, jnp.zeros((2, 4)))[1]))(B)
    np.testing.assert_allclose(grad, np.linalg.inv(np.asarray(B)).transpose(0, 2, 1), rtol=1e-10)
