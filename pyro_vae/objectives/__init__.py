"""Training objectives, registered in ``OBJECTIVES`` by name: ``elbo``, ``mean_field`` (elbo.py) and
``iwae`` (iwae.py), on the :class:`Objective` base (base.py): KL weight and warm-up, the trainer's
selection score, the SVI adapter."""

from .base import OBJECTIVES, Objective, PyroObjective, as_objective
from .elbo import MeanFieldELBO, TraceELBO
from .iwae import IWAE

__all__ = ["OBJECTIVES", "Objective", "PyroObjective", "as_objective", "TraceELBO", "MeanFieldELBO", "IWAE"]
