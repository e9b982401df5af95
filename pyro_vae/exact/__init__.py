"""Reference models whose log p(x), posterior and ELBO are exact, to check the estimators against:
the linear-Gaussian model (probabilistic PCA) and the Gaussian mixture."""

from .gaussian_mixture import GaussianMixture
from .linear_gaussian import LinearGaussian, LinearGaussianGuide

__all__ = ["GaussianMixture", "LinearGaussian", "LinearGaussianGuide"]
