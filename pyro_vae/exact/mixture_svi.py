"""SVI for a Gaussian mixture: a mixture with trainable π, μ_c, Σ_c, an amortized categorical guide
q(c | x), their k-means++ initialization, the fitting loop and a gradient-moment helper.

Two ways to fit the same model c ~ Categorical(π), x | c ~ N(μ_c, Σ_c) by SVI (:func:`fit`):

    enumerate:  loss = −Σ_n log Σ_c p(x_n, c) = −log p(x)          (c summed out, exact gradient)
    amortized:  loss = −Σ_n [log p(x_n, c_n) − log q(c_n|x_n)],  c_n ~ q(c|x_n)   (score function for φ)

The exact mixture :class:`~pyro_vae.exact.gaussian_mixture.GaussianMixture` at the current
parameters (:meth:`TrainableGaussianMixture.as_mixture`) gives log p(x), p(c|x) and the ELBO of
any categorical guide exactly, so every step of either fit can be checked against the truth and
against scikit-learn's EM from the same start (:func:`init_params`). The study that does so is
``pyro-vae exact gaussian_mixture`` (:mod:`pyro_vae.studies.gaussian_mixture`).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate

from .gaussian_mixture import GaussianMixture, check_data

__all__ = ["TrainableGaussianMixture", "CategoricalGuide", "FitResult", "init_params", "fit", "gradient_moments"]

# Unique Pyro names, so two instances never share entries of Pyro's global param store.
_instance_ids = itertools.count()


class TrainableGaussianMixture(torch.nn.Module):
    """A Gaussian mixture whose π, μ_c, Σ_c are learnable, always valid, never singular.

    Unconstrained parameters map onto valid ones: π = softmax(logits) lies on the simplex;
    full: Σ_c = L_c L_cᵀ + ε I with L_c lower triangular with diagonal exp(r_c);
    diag: σ_c² = exp(2 r_c) + ε. The log scale r_c makes Adam's steps relative changes of the
    scale. The floor ε = ``reg_covar`` (scikit-learn's ``reg_covar``) keeps a component that
    collapses onto one point at a finite density (Σ_c ⪰ ε I) instead of an infinite likelihood.

    :meth:`as_mixture` is the :class:`GaussianMixture` at the current parameters, differentiable in
    them; :meth:`fixed` a detached copy.

    :param weights, locs, covariances: the initial π (C,), μ (C, D), Σ (C, D, D) (see :func:`init_params`).
    :param covariance_type: ``"full"`` or ``"diag"`` (then only the diagonal of ``covariances`` is used).
    :param reg_covar: the covariance floor ε > 0.
    """

    def __init__(self, weights, locs, covariances, covariance_type: str = "full", reg_covar: float = 1e-6):
        super().__init__()
        if covariance_type not in ("full", "diag"):
            raise ValueError(f"covariance_type must be 'full' or 'diag', got {covariance_type!r}")
        if not reg_covar > 0:
            raise ValueError(f"reg_covar must be > 0 (the covariance floor), got {reg_covar}")
        # Validate the initial values through the exact class (one place for the checks).
        init = GaussianMixture.from_covariances(weights, locs, covariances)
        self.covariance_type, self.reg_covar = covariance_type, reg_covar
        self._pyro_name = f"gaussian_mixture_{next(_instance_ids)}"
        # A zero initial weight would give logit −inf and NaN gradients; start it tiny instead.
        self.logits = torch.nn.Parameter(init.weights.clamp(min=1e-12).log())
        self.locs = torch.nn.Parameter(init.locs.clone())
        floor = reg_covar * torch.eye(init.dim, dtype=init.locs.dtype)
        if covariance_type == "full":
            # Start L with L Lᵀ + ε I = Σ when Σ is above the floor, else at Σ itself.
            tril, info = torch.linalg.cholesky_ex(init.covariances - floor)
            tril = torch.where((info == 0)[:, None, None], tril, init.scale_tril)
            raw = tril.tril(-1) + torch.diag_embed(tril.diagonal(dim1=-2, dim2=-1).log())
        else:
            var = init.covariances.diagonal(dim1=-2, dim2=-1)
            raw = 0.5 * (var - reg_covar).clamp(min=reg_covar).log()
        self.scale_param = torch.nn.Parameter(raw)

    def _scale(self) -> dict:
        """The keyword argument of GaussianMixture for the current Σ: scale_tril or scales."""
        raw = self.scale_param
        if self.covariance_type == "diag":
            return {"scales": ((2 * raw).exp() + self.reg_covar).sqrt()}
        tril = raw.tril(-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())
        eye = torch.eye(raw.shape[-1], dtype=raw.dtype, device=raw.device)
        return {"scale_tril": torch.linalg.cholesky(tril @ tril.transpose(-1, -2) + self.reg_covar * eye)}

    def as_mixture(self) -> GaussianMixture:
        """The mixture at the current parameters; its results are differentiable in them."""
        return GaussianMixture(self.logits.softmax(-1), self.locs, **self._scale())

    def fixed(self) -> GaussianMixture:
        """A detached copy of the mixture at the current parameters."""
        with torch.no_grad():
            return GaussianMixture(self.logits.softmax(-1), self.locs.detach().clone(), **self._scale())

    def model(self, x) -> None:
        """:meth:`GaussianMixture.model` at the current parameters; registers them with Pyro's param
        store so ``pyro.infer.SVI`` trains them."""
        pyro.module(self._pyro_name, self)
        self.as_mixture().model(x)


class CategoricalGuide(torch.nn.Module):
    """Amortized guide q(c | x) = Categorical(softmax(f(x))), f an MLP D → H → C (tanh).

    Under ``Trace_ELBO`` c is sampled, so the encoder gets score-function gradients
    ∇φ log q(c|x) · [log p(x, c) − log q(c|x)]; under ``TraceEnum_ELBO`` with
    ``config_enumerate(guide.guide)`` the sum over c is exact.
    """

    def __init__(self, dim: int, num_components: int, hidden_dim: int = 32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden_dim), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden_dim, num_components))
        self._pyro_name = f"categorical_guide_{next(_instance_ids)}"

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """log q(c | x_n), shape (N, C)."""
        return self.net(x).log_softmax(-1)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """q(c | x_n), shape (N, C)."""
        return self.logits(x).exp()

    def guide(self, x: torch.Tensor) -> None:
        """The Pyro guide: c_n ~ q(c | x_n) in the plate ``"data"``; registers the network with Pyro."""
        pyro.module(self._pyro_name, self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Categorical(logits=self.logits(x)))


def init_params(x, num_components: int, covariance_type: str = "full", reg_covar: float = 1e-6,
                seed: int = 0) -> dict:
    """Initial π, μ, Σ: uniform weights, k-means++ seeded means, every Σ_c = the data covariance.

    Greedy k-means++ (as scikit-learn's): the first mean is a random data point; for each next one,
    2 + log C candidates are drawn with probability ∝ squared distance to the nearest mean so far
    and the one that most reduces the total squared distance is kept, so means start in distinct clusters.

    The same dict initializes SVI and scikit-learn (``weights_init``, ``means_init``,
    ``precisions_init`` = Σ⁻¹), so both climb from one starting point.
    """
    x = check_data(x)
    N, D = x.shape
    if not 1 <= num_components <= N:
        raise ValueError(f"num_components={num_components} but x has {N} rows; use between 1 and {N} "
                         f"components (each needs data points of its own)")
    generator = torch.Generator().manual_seed(seed)
    locs = x[torch.randint(N, (1,), generator=generator)]
    num_trials = 2 + int(math.log(num_components))
    for _ in range(num_components - 1):
        d2 = torch.cdist(x, locs).pow(2).min(1).values
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)  # all points equal: any point will do
        candidates = torch.multinomial(weights, num_trials, replacement=True, generator=generator)
        total = torch.minimum(d2[:, None], torch.cdist(x, x[candidates]).pow(2)).sum(0)
        locs = torch.cat([locs, x[candidates[total.argmin()]][None]])
    centered = x - x.mean(0)
    cov = centered.T @ centered / N + reg_covar * torch.eye(D, dtype=x.dtype)
    if covariance_type == "diag":
        cov = torch.diag_embed(cov.diagonal())
    weights = torch.full((num_components,), 1.0 / num_components, dtype=x.dtype)
    return {"weights": weights, "locs": locs, "covariances": cov.expand(num_components, D, D).clone()}


def _no_guide(x) -> None:
    """Empty guide: with the model's c enumerated, TraceEnum_ELBO's loss is exactly −log p(x)."""


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained mixture and guide (None for ``"enumerate"``), the
    training loss per data point at every step, (steps done, training seconds, exact mean log p(x))
    every ``eval_every`` steps and at the last, and the training seconds (evaluations left out)."""

    mixture: TrainableGaussianMixture
    guide: CategoricalGuide | None
    losses: list = field(default_factory=list)        # training loss per data point, each step
    log_px: list = field(default_factory=list)        # (steps done, training seconds, exact mean log p(x))
    seconds: float = 0.0


def fit(x, num_components: int, method: str = "enumerate", covariance_type: str = "full", *,
        num_steps: int = 1000, lr: float = 0.05, final_lr: float | None = None, batch_size: int | None = None,
        init: dict | None = None, reg_covar: float = 1e-6, hidden_dim: int = 32, num_particles: int = 1,
        eval_every: int = 10, seed: int = 0, progress: bool = False) -> FitResult:
    """Fit a Gaussian mixture by SVI (Adam on the negative ELBO, per data point).

    ``method="enumerate"``: the model's c is summed out (``config_enumerate`` + ``TraceEnum_ELBO``,
    empty guide), so the loss is exactly −log p(x) and its gradient exact: maximum likelihood, the
    same optimum as EM. ``method="amortized"``: ``Trace_ELBO`` with the sampled guide
    :class:`CategoricalGuide`, maximizing log p(x) − KL(q(c|x) || p(c|x)) with score-function gradients.

    :param x: data, shape (N, D).
    :param num_components: C, at most N.
    :param method: ``"enumerate"`` or ``"amortized"``.
    :param covariance_type: ``"full"`` or ``"diag"`` (:class:`TrainableGaussianMixture`).
    :param num_steps: Adam steps.
    :param lr, final_lr: Adam's step size decays geometrically from ``lr`` to ``final_lr`` (default lr).
    :param batch_size: minibatch size, or None for the full data each step.
    :param init: the initial π, μ, Σ (default :func:`init_params` with ``seed``).
    :param reg_covar: the covariance floor ε.
    :param hidden_dim, num_particles: the amortized guide's hidden width and ELBO particles per step.
    :param eval_every: record the exact mean log p(x) of the current fit every this many steps.
    :param seed: seeds Pyro's RNG (the guide's initialization and the sampled c).
    :param progress: show a tqdm bar over the steps.
    :returns: a :class:`FitResult`.
    """
    from tqdm.auto import tqdm

    if method not in ("enumerate", "amortized"):
        raise ValueError(f"method must be 'enumerate' or 'amortized', got {method!r}")
    x = check_data(x)
    init = init if init is not None else init_params(x, num_components, covariance_type, reg_covar, seed)
    pyro.set_rng_seed(seed)
    mixture = TrainableGaussianMixture(**init, covariance_type=covariance_type, reg_covar=reg_covar).to(x.dtype)
    if method == "enumerate":
        guide, model, guide_fn = None, config_enumerate(mixture.model), _no_guide
        elbo = TraceEnum_ELBO(max_plate_nesting=1)
    else:
        guide = CategoricalGuide(x.shape[1], num_components, hidden_dim).to(x.dtype)
        model, guide_fn = mixture.model, guide.guide
        elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    params = list(mixture.parameters()) + (list(guide.parameters()) if guide else [])
    optimizer = torch.optim.Adam(params, lr=lr)
    decay = (final_lr / lr) ** (1 / max(num_steps, 1)) if final_lr else 1.0
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=decay)
    result = FitResult(mixture, guide)
    for step in tqdm(range(num_steps), desc=f"fit ({method})", disable=not progress, leave=False):
        start = time.perf_counter()
        batch = x if batch_size is None else x[torch.randint(len(x), (batch_size,))]
        optimizer.zero_grad()
        loss = elbo.differentiable_loss(model, guide_fn, batch) / len(batch)
        loss.backward()
        optimizer.step()
        scheduler.step()
        result.seconds += time.perf_counter() - start  # training time only, not the evaluation below
        result.losses.append(loss.item())
        if step % eval_every == 0 or step == num_steps - 1:
            with torch.no_grad():
                result.log_px.append((step + 1, result.seconds, mixture.as_mixture().log_px(x).mean().item()))
    return result


def gradient_moments(loss_fn, params, num_draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and per-coordinate variance of a stochastic gradient estimator at fixed parameters.

    Each call of ``loss_fn()`` draws fresh randomness (latent samples, minibatch); its gradient
    ĝ_i with respect to ``params`` (flattened into one vector) is one draw. Returns
    (mean over draws, unbiased variance over draws), each of the length of all params together;
    ``variance.sum()`` is tr Cov[ĝ], the total gradient variance.
    """
    draws = []
    for _ in range(num_draws):
        grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
        draws.append(torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                for g, p in zip(grads, params)]))
    draws = torch.stack(draws)
    return draws.mean(0), draws.var(0)
