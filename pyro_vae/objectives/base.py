"""The objective base class and the registry. Each registered class builds an :class:`Objective` with
``differentiable_loss(model, guide, *args, **kwargs)``, the negative objective as a differentiable
tensor (what Pyro's ELBO classes provide), so the trainer treats them alike; ``loss_and_grads``
makes them usable with ``pyro.infer.SVI`` too.

All take a KL weight ``beta`` and a linear warm-up: the trainer calls ``on_epoch(epoch)`` before
each epoch, and the weight is ``beta * min(1, epoch / warmup_epochs)`` (``beta`` throughout when
``warmup_epochs=0``). The weight multiplies the *latent* sites of model and guide (log p(z) and
log q(z|x)), so ELBO_beta = E_q[log p(x|z)] - beta KL(q(z|x) || p(z)).

Plates are found by a dry run of each new (model, guide) pair (:func:`pyro_vae.traces.dry_run`),
so every objective works on every model :func:`pyro_vae.estimate_log_px` accepts, whatever the
data plate's dim; an objective reused on another pair learns that pair's plates anew.
"""

from __future__ import annotations

import torch
from pyro.poutine.messenger import Messenger

from ..checks import positive_int
from ..registry import Registry

OBJECTIVES = Registry("objective")


class _ScaleLatents(Messenger):
    """Multiplies the scale of every latent (unobserved) sample site by ``weight``."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.weight * msg["scale"]


class Objective:
    """Base class: KL weight, warm-up schedule, the trainer's selection score and the SVI adapter.

    Subclasses define ``_prepare(model, guide, args, kwargs)``, what they learn once per (model,
    guide) pair, and ``_loss(model, guide, prepared, *args, **kwargs)``.
    """

    #: what :meth:`selection_score` measures; the trainer logs it as ``val_<selection_name>``.
    selection_name = "elbo"

    def __init__(self, beta: float = 1.0, warmup_epochs: int = 0):
        if not beta >= 0:
            raise ValueError(f"objective.beta must be >= 0, got {beta!r}")
        self.beta, self.warmup_epochs = float(beta), positive_int(warmup_epochs, "objective.warmup_epochs", 0)
        self.kl_weight = self.beta if self.warmup_epochs == 0 else 0.0
        self._prepared = {}  # (model, guide) -> what _prepare learned

    def on_epoch(self, epoch: int) -> None:
        """Linear KL warm-up: the weight is beta * min(1, epoch / warmup_epochs) during ``epoch``."""
        self.kl_weight = self.beta * (min(1.0, epoch / self.warmup_epochs) if self.warmup_epochs else 1.0)

    @torch.no_grad()
    def selection_score(self, vae, x: torch.Tensor, batch_size: int = 1000) -> float:
        """The mean per-point score over the rows of x that the trainer selects epochs on (beta = 1,
        whatever the warm-up): the ELBO, E_q[log p(x|z)] - KL(q(z|x) || p(z))."""
        log_lik, kl = map(torch.cat, zip(*(vae.elbo_terms(b) for b in x.split(batch_size))))
        return (log_lik - kl).mean().item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative objective (with the current KL weight) as a differentiable scalar."""
        prepared = self._prepared_for(model, guide, args, kwargs)
        return self._loss(*self._weighted(model, guide), prepared, *args, **kwargs)

    def _prepared_for(self, model, guide, args, kwargs):
        key = (model, guide)  # bound methods compare equal for the same object: vae.model == vae.model
        if key not in self._prepared:
            if len(self._prepared) >= 8:  # a bounded cache: drop the oldest pair
                self._prepared.pop(next(iter(self._prepared)))
            self._prepared[key] = self._prepare(model, guide, args, kwargs)
        return self._prepared[key]

    def _weighted(self, model, guide):
        if self.kl_weight == 1.0:
            return model, guide
        weight = self.kl_weight

        def wrap(fn):
            def weighted(*args, **kwargs):
                with _ScaleLatents(weight):
                    return fn(*args, **kwargs)
            return weighted
        return wrap(model), wrap(guide)

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return self.differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """For ``pyro.infer.SVI``: backpropagate the loss into the parameters, return its value."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def _prepare(self, model, guide, args, kwargs):
        return None

    def _loss(self, model, guide, prepared, *args, **kwargs):  # pragma: no cover - interface
        raise NotImplementedError


class PyroObjective(Objective):
    """Any Pyro ELBO (or object with ``differentiable_loss(model, guide, *args, **kwargs)``) as an
    :class:`Objective`: no KL weight of its own, the ELBO as selection score."""

    def __init__(self, elbo):
        super().__init__()
        self.elbo = elbo

    def _loss(self, model, guide, prepared, *args, **kwargs):
        return self.elbo.differentiable_loss(model, guide, *args, **kwargs)


def as_objective(loss) -> Objective:
    """``loss`` itself if it is an :class:`Objective`, else ``loss`` wrapped in :class:`PyroObjective`."""
    return loss if isinstance(loss, Objective) else PyroObjective(loss)
