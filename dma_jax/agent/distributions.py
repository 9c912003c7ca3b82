"""Dirichlet distributions on the simplex: the policy's action distribution and CQL's uniform proposal.

Why Dirichlet (not logistic-normal): it lives on the simplex itself, treats all
domains alike (no reference domain), has a closed-form log-density and entropy,
and `jax.random.dirichlet` draws through JAX's gamma sampler, whose samples are
differentiable in the concentrations (implicit reparameterisation), which the
SAC actor loss needs. Densities are w.r.t. Lebesgue measure on the first D-1
coordinates, so the uniform distribution Dirichlet(1) has density (D-1)!.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln

# Samples are floored at EPS and renormalised so that log-densities stay finite.
EPS = 1e-6


def log_prob(alpha_xD: jax.Array, x_xD: jax.Array) -> jax.Array:
    """log Dir(x | alpha) = log Gamma(alpha_0) - sum log Gamma(alpha_d) + sum (alpha_d - 1) log x_d."""
    log_x = jnp.log(jnp.maximum(x_xD, EPS))
    return gammaln(alpha_xD.sum(-1)) - gammaln(alpha_xD).sum(-1) + ((alpha_xD - 1.0) * log_x).sum(-1)


def entropy(alpha_xD: jax.Array) -> jax.Array:
    """Differential entropy: log B(alpha) + (alpha_0 - D) psi(alpha_0) - sum (alpha_d - 1) psi(alpha_d)."""
    alpha0_x = alpha_xD.sum(-1)
    d = alpha_xD.shape[-1]
    log_beta_x = gammaln(alpha_xD).sum(-1) - gammaln(alpha0_x)
    return log_beta_x + (alpha0_x - d) * digamma(alpha0_x) - ((alpha_xD - 1.0) * digamma(alpha_xD)).sum(-1)


def mean(alpha_xD: jax.Array) -> jax.Array:
    return alpha_xD / alpha_xD.sum(-1, keepdims=True)


def _floor(x_xD: jax.Array) -> jax.Array:
    x_xD = jnp.maximum(x_xD, EPS)
    return x_xD / x_xD.sum(-1, keepdims=True)


def sample_each(key: jax.Array, alpha_xD: jax.Array) -> jax.Array:
    """One reparameterised draw per row of alpha (gradients flow to alpha); one sampler call for all rows."""
    return _floor(jax.random.dirichlet(key, alpha_xD, shape=alpha_xD.shape[:-1]))


def sample(key: jax.Array, alpha_xD: jax.Array, n: int) -> jax.Array:
    """n reparameterised draws [n, *alpha.shape]."""
    return sample_each(key, jnp.broadcast_to(alpha_xD, (n, *alpha_xD.shape)))


def uniform_log_prob(d: int) -> float:
    """log density of the uniform distribution on the (d-1)-simplex: log((d-1)!)."""
    return math.lgamma(d)


def symmetric_entropy(concentration: float, d: int) -> float:
    """Entropy of Dirichlet(concentration * 1_d), e.g. a target entropy that scales with d."""
    return float(entropy(jnp.full((d,), concentration, jnp.float32)))
