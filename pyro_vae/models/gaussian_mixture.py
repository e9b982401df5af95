"""Gaussian mixture: the latent variable model in which every quantity is exact.

    c ~ Categorical(π),    x | c ~ N(μ_c, Σ_c),    c ∈ {0, …, C−1},  x ∈ R^D

    log p(x)    = logsumexp_c [log π_c + log N(x; μ_c, Σ_c)]
    p(c | x)    = exp(log π_c + log N(x; μ_c, Σ_c) − log p(x))
    ELBO(q; x)  = Σ_c q(c|x) [log p(x, c) − log q(c|x)] = log p(x) − KL(q(c|x) || p(c|x))

Because c is discrete and finite, each expectation over it is a finite sum, so the evidence,
the posterior and the ELBO of any categorical guide are computed exactly here. They are the
ground truth against which SVI and the estimators of :mod:`pyro_vae.marginal` are checked.

Covariances are either ``"full"`` (Σ_c = L_c L_cᵀ, given by the Cholesky factor ``scale_tril``)
or ``"diag"`` (Σ_c = diag(σ_c²), given by ``scales``).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch
import pyro
import pyro.distributions as dist
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate

__all__ = ["GaussianMixture", "TrainableGaussianMixture", "CategoricalGuide", "FitResult",
           "check_data", "init_params", "fit", "gradient_moments"]

# Unique Pyro names, so two instances never share entries of Pyro's global param store.
_instance_ids = itertools.count()


def check_data(x, dim: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``x`` as a finite (N, D) tensor, or raise a one-line ``ValueError`` saying how to fix it.

    :param x: data, one row per point (tensor or array-like).
    :param dim: the expected D (the mixture's dimension), or None to accept any.
    :param dtype: cast to this floating dtype (the parameters'), or keep x's own.
    """
    x = torch.as_tensor(x)
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"x must hold real numbers, got dtype {x.dtype}; convert it with x.float()")
    if x.dim() != 2:
        hint = "x.reshape(-1, %d)" % dim if dim else "x.reshape(N, D)"
        raise ValueError(f"x must have shape (N, D), one row per data point, got shape "
                         f"{tuple(x.shape)}; reshape it, e.g. {hint}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"x has {x.shape[1]} columns but the mixture has dimension {dim}; "
                         f"pass data of shape (N, {dim})")
    if x.shape[0] == 0:
        raise ValueError("x has no rows; pass at least one data point")
    x = x.to(dtype if dtype is not None else (x.dtype if x.is_floating_point() else torch.get_default_dtype()))
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"x has {int(bad.sum())} row(s) with NaN or inf (first: {rows}); "
                         f"remove or impute them before using the mixture")
    return x


class _MixtureMath:
    """The exact formulas, shared by fixed and trainable mixtures.

    Subclasses provide ``weights`` (C,), ``locs`` (C, D), ``covariance_type`` and either
    ``scale_tril`` (C, D, D, full) or ``scales`` (C, D, diag), as tensors or properties.
    """

    covariance_type: str

    @property
    def num_components(self) -> int:
        return self.locs.shape[0]

    @property
    def dim(self) -> int:
        return self.locs.shape[1]

    @property
    def covariances(self) -> torch.Tensor:
        """Σ_c, shape (C, D, D), for either covariance type."""
        if self.covariance_type == "full":
            return self.scale_tril @ self.scale_tril.transpose(-1, -2)
        return torch.diag_embed(self.scales**2)

    def _component(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.Distribution:
        # One code path for both covariance types: the event is the D coordinates of x.
        if self.covariance_type == "full":
            return dist.MultivariateNormal(loc, scale_tril=scale)
        return dist.Normal(loc, scale).to_event(1)

    def _scale(self) -> torch.Tensor:
        return self.scale_tril if self.covariance_type == "full" else self.scales

    def components(self) -> dist.Distribution:
        """The C Gaussians N(μ_c, Σ_c) as one distribution, batch shape (C,), event shape (D,)."""
        return self._component(self.locs, self._scale())

    def log_joint(self, x) -> torch.Tensor:
        """log p(x_n, c) = log π_c + log N(x_n; μ_c, Σ_c), shape (N, C)."""
        x = check_data(x, self.dim, self.locs.dtype)
        # x[:, None, :] broadcasts each point against the C components.
        return self.weights.log() + self.components().log_prob(x[:, None, :])

    def log_px(self, x) -> torch.Tensor:
        """Exact evidence log p(x_n) = logsumexp_c log p(x_n, c), shape (N,)."""
        return self.log_joint(x).logsumexp(-1)

    def posterior_log_probs(self, x) -> torch.Tensor:
        """Exact log p(c | x_n) = log p(x_n, c) − log p(x_n), shape (N, C)."""
        log_joint = self.log_joint(x)
        return log_joint - log_joint.logsumexp(-1, keepdim=True)

    def posterior_probs(self, x) -> torch.Tensor:
        """Exact posterior p(c | x_n) (the responsibilities), shape (N, C); rows sum to 1."""
        return self.posterior_log_probs(x).exp()

    def elbo(self, x, guide_probs: torch.Tensor) -> torch.Tensor:
        """Exact per-point ELBO of a categorical guide q(c | x_n) = ``guide_probs[n, c]``, shape (N,).

        ELBO_n = Σ_c q_nc [log p(x_n, c) − log q_nc], a finite sum (0 · log 0 := 0), which equals
        log p(x_n) − KL(q(c|x_n) || p(c|x_n)).
        """
        log_joint = self.log_joint(x)
        q = torch.as_tensor(guide_probs, dtype=log_joint.dtype)
        if q.shape != log_joint.shape:
            raise ValueError(f"guide_probs must have shape (N, C) = {tuple(log_joint.shape)}, "
                             f"got {tuple(q.shape)}; pass one row of C probabilities per data point")
        # xlogy gives 0 where q = 0, so a guide may put zero mass on a component.
        return (q * log_joint).sum(-1) - torch.xlogy(q, q).sum(-1)

    def model(self, x) -> None:
        """Pyro model: for each row of x, c ~ Categorical(π) and x ~ N(μ_c, Σ_c) (observed).

        The per-point latent ``"c"`` and observation ``"x"`` live in ``pyro.plate("data", N)``.
        Wrap with :func:`pyro.infer.config_enumerate` to sum c out under ``TraceEnum_ELBO``.
        """
        weights, locs, scale = self.weights, self.locs, self._scale()
        x = check_data(x, self.dim, locs.dtype)
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(weights))
            # Indexing by c works both for sampled c (N,) and enumerated c (C, 1).
            pyro.sample("x", self._component(locs[c], scale[c]), obs=x)

    def sample(self, num_samples: int, generator: torch.Generator | None = None):
        """Draw (x, c): x of shape (num_samples, D) and the labels c of shape (num_samples,)."""
        c = torch.multinomial(self.weights.detach(), num_samples, replacement=True, generator=generator)
        eps = torch.randn(num_samples, self.dim, dtype=self.locs.dtype, generator=generator)
        scale = self._scale().detach()
        if self.covariance_type == "full":
            x = self.locs.detach()[c] + (scale[c] @ eps[:, :, None]).squeeze(-1)
        else:
            x = self.locs.detach()[c] + scale[c] * eps
        return x, c


class GaussianMixture(_MixtureMath):
    """A Gaussian mixture with fixed parameters: exact ``log_px``, ``posterior_probs``, ``elbo``.

    :param weights: mixing weights π, shape (C,), non-negative, summing to 1.
    :param locs: component means μ_c, shape (C, D).
    :param scale_tril: Cholesky factors L_c of Σ_c = L_c L_cᵀ, shape (C, D, D), positive diagonal
        (full covariance). Give exactly one of ``scale_tril`` and ``scales``.
    :param scales: standard deviations σ_c, shape (C, D), positive (diagonal covariance).

    The dtype of ``locs`` sets the dtype of every computation; data are cast to it.
    """

    def __init__(self, weights, locs, scale_tril=None, scales=None):
        locs = torch.as_tensor(locs)
        if not locs.is_floating_point():
            locs = locs.to(torch.get_default_dtype())
        if locs.dim() != 2:
            raise ValueError(f"locs must have shape (C, D), got {tuple(locs.shape)}; one row per component")
        C, D = locs.shape
        weights = torch.as_tensor(weights, dtype=locs.dtype)
        if weights.shape != (C,):
            raise ValueError(f"weights must have shape ({C},) to match locs, got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-5:
            raise ValueError(f"weights must be non-negative and sum to 1, got {weights.tolist()}; "
                             f"normalize them with weights / weights.sum()")
        if not torch.isfinite(locs).all():
            raise ValueError("locs contains NaN or inf; pass finite component means")
        if (scale_tril is None) == (scales is None):
            raise ValueError("give exactly one of scale_tril (full covariance) or scales (diagonal covariance)")
        if scale_tril is not None:
            scale = torch.as_tensor(scale_tril, dtype=locs.dtype)
            if scale.shape != (C, D, D):
                raise ValueError(f"scale_tril must have shape ({C}, {D}, {D}), got {tuple(scale.shape)}")
            diag = scale.diagonal(dim1=-2, dim2=-1)
            if not torch.equal(scale, scale.tril()):
                raise ValueError("scale_tril must be lower triangular; pass torch.linalg.cholesky(covariance)")
        else:
            scale = torch.as_tensor(scales, dtype=locs.dtype)
            if scale.shape != (C, D):
                raise ValueError(f"scales must have shape ({C}, {D}), got {tuple(scale.shape)}")
            diag = scale
        if not torch.isfinite(scale).all() or not (diag > 0).all():
            raise ValueError("covariances must be positive definite (positive Cholesky diagonal / scales) "
                             "and finite; a collapsed component has zero scale: add a floor, e.g. "
                             "covariance + 1e-6 * I")
        self.weights, self.locs = weights, locs
        self.covariance_type = "full" if scale_tril is not None else "diag"
        if scale_tril is not None:
            self.scale_tril = scale
        else:
            self.scales = scale

    @classmethod
    def from_covariances(cls, weights, locs, covariances) -> "GaussianMixture":
        """Full-covariance mixture from Σ_c of shape (C, D, D); raises if a Σ_c is not positive definite."""
        covariances = torch.as_tensor(covariances, dtype=torch.as_tensor(locs).dtype)
        scale_tril, info = torch.linalg.cholesky_ex(covariances)
        if (info != 0).any():
            bad = (info != 0).nonzero().flatten().tolist()
            raise ValueError(f"covariance of component(s) {bad} is not positive definite; "
                             f"add a floor, e.g. covariance + 1e-6 * I")
        return cls(weights, locs, scale_tril=scale_tril)

    def __repr__(self) -> str:
        return f"GaussianMixture(C={self.num_components}, D={self.dim}, covariance_type={self.covariance_type!r})"


class TrainableGaussianMixture(_MixtureMath, torch.nn.Module):
    """A Gaussian mixture whose π, μ_c, Σ_c are learnable, always valid, never singular.

    Unconstrained parameters map onto valid ones: π = softmax(logits) lies on the simplex;
    full: Σ_c = L_c L_cᵀ + ε I with L_c lower triangular with diagonal exp(r_c);
    diag: σ_c² = exp(2 r_c) + ε. The log scale r_c makes Adam's steps relative changes of the
    scale, so a variance that starts at 25 reaches 1 in tens of steps, not hundreds. The floor
    ε = ``reg_covar`` (scikit-learn's ``reg_covar``) keeps a component that collapses onto one
    point at a finite density (Σ_c ⪰ ε I) instead of an infinite likelihood and NaN.

    :param weights, locs, covariances: the initial π (C,), μ (C, D), Σ (C, D, D) (see :func:`init_params`).
    :param covariance_type: ``"full"`` or ``"diag"`` (then only the diagonal of ``covariances`` is used).
    :param reg_covar: the covariance floor ε > 0.
    """

    def __init__(self, weights, locs, covariances, covariance_type: str = "full", reg_covar: float = 1e-6):
        torch.nn.Module.__init__(self)
        if covariance_type not in ("full", "diag"):
            raise ValueError(f"covariance_type must be 'full' or 'diag', got {covariance_type!r}")
        if not reg_covar > 0:
            raise ValueError(f"reg_covar must be > 0 (the covariance floor), got {reg_covar}")
        # Validate the initial values through the fixed class (one place for the checks).
        fixed = GaussianMixture.from_covariances(weights, locs, covariances)
        self.covariance_type, self.reg_covar = covariance_type, reg_covar
        self._pyro_name = f"gaussian_mixture_{next(_instance_ids)}"
        # A zero initial weight would give logit −inf and NaN gradients; start it tiny instead.
        self.logits = torch.nn.Parameter(fixed.weights.clamp(min=1e-12).log())
        self.loc_param = torch.nn.Parameter(fixed.locs.clone())
        floor = reg_covar * torch.eye(fixed.dim, dtype=fixed.locs.dtype)
        if covariance_type == "full":
            # Start L with L Lᵀ + ε I = Σ when Σ is above the floor, else at Σ itself.
            tril, info = torch.linalg.cholesky_ex(fixed.covariances - floor)
            tril = torch.where((info == 0)[:, None, None], tril, fixed.scale_tril)
            raw = tril.tril(-1) + torch.diag_embed(tril.diagonal(dim1=-2, dim2=-1).log())
        else:
            var = fixed.covariances.diagonal(dim1=-2, dim2=-1)
            raw = 0.5 * (var - reg_covar).clamp(min=reg_covar).log()
        self.scale_param = torch.nn.Parameter(raw)

    @property
    def weights(self) -> torch.Tensor:
        return self.logits.softmax(-1)

    @property
    def locs(self) -> torch.Tensor:
        return self.loc_param

    @property
    def scale_tril(self) -> torch.Tensor:
        raw = self.scale_param
        tril = raw.tril(-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())
        eye = torch.eye(self.dim, dtype=raw.dtype)
        return torch.linalg.cholesky(tril @ tril.transpose(-1, -2) + self.reg_covar * eye)

    @property
    def scales(self) -> torch.Tensor:
        return ((2 * self.scale_param).exp() + self.reg_covar).sqrt()

    def model(self, x) -> None:
        """As :meth:`GaussianMixture.model`; registers the parameters so ``pyro.infer.SVI`` trains them."""
        pyro.module(self._pyro_name, self)
        super().model(x)

    def fixed(self) -> GaussianMixture:
        """A detached copy with the current parameters."""
        scale = self._scale().detach().clone()
        kwargs = {"scale_tril": scale} if self.covariance_type == "full" else {"scales": scale}
        return GaussianMixture(self.weights.detach().clone(), self.locs.detach().clone(), **kwargs)


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
        return self.net(x).log_softmax(-1)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """q(c | x_n), shape (N, C)."""
        return self.logits(x).exp()

    def guide(self, x: torch.Tensor) -> None:
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
    mixture: TrainableGaussianMixture
    guide: CategoricalGuide | None
    losses: list = field(default_factory=list)        # training loss per data point, each step
    log_px: list = field(default_factory=list)        # (steps done, training seconds, exact mean log p(x))
    seconds: float = 0.0


def fit(x, num_components: int, method: str = "enumerate", covariance_type: str = "full", *,
        num_steps: int = 1000, lr: float = 0.05, final_lr: float | None = None, batch_size: int | None = None,
        init: dict | None = None, reg_covar: float = 1e-6, hidden_dim: int = 32, num_particles: int = 1,
        eval_every: int = 10, seed: int = 0) -> FitResult:
    """Fit a Gaussian mixture by SVI (Adam on the negative ELBO, per data point).

    ``method="enumerate"``: the model's c is summed out (``config_enumerate`` + ``TraceEnum_ELBO``,
    empty guide), so the loss is exactly −log p(x) and its gradient exact: maximum likelihood, the
    same optimum as EM. ``method="amortized"``: ``Trace_ELBO`` with the sampled guide
    :class:`CategoricalGuide`, maximizing log p(x) − KL(q(c|x) || p(c|x)) with score-function gradients.

    :param lr, final_lr: Adam's step size decays geometrically from ``lr`` to ``final_lr`` (default lr).
    :param batch_size: minibatch size, or None for the full data each step.
    :param eval_every: record the exact mean log p(x) of the current fit every this many steps.
    """
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
    for step in range(num_steps):
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
                result.log_px.append((step + 1, result.seconds, mixture.log_px(x).mean().item()))
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
