"""Training objectives. Each registered factory returns an object with
``differentiable_loss(model, guide, *args, **kwargs)``, the negative objective as a
differentiable tensor (what Pyro's ELBO classes provide), so the trainer treats them alike."""

from __future__ import annotations

import pyro.infer

from .registry import Registry

OBJECTIVES = Registry("objective")


@OBJECTIVES.register("elbo")
def trace_elbo(num_particles: int = 1):
    """ELBO = E_q[log p(x, z) - log q(z|x)], Monte Carlo with ``num_particles`` reparameterized
    samples (vectorized), i.e. Pyro's Trace_ELBO."""
    return pyro.infer.Trace_ELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
    )
