"""pyro-vae: variational autoencoders on Pyro, written the way the textbook derives them."""

from .bdmc import BDMCResult, bdmc
from .build import MODELS, build_model, build_objective
from .data import check_and_binarize, load_dataset
from .evaluation import evaluate_run, load_run
from .experiment import train_run
from .gaps import GapsResult, inference_gaps
from .guides import GUIDES, Guide
from .likelihoods import LIKELIHOODS, Likelihood
from .marginal import LogPxEstimate, estimate_log_px
from .objectives import OBJECTIVES
from .priors import PRIORS, Prior
from .train import TrainConfig, fit
from .vae import VAE

__all__ = [
    "VAE", "estimate_log_px", "LogPxEstimate", "build_model", "build_objective", "load_dataset", "check_and_binarize",
    "fit", "TrainConfig", "train_run", "evaluate_run", "load_run",
    "PRIORS", "GUIDES", "LIKELIHOODS", "OBJECTIVES", "MODELS", "Prior", "Guide", "Likelihood", "bdmc", "BDMCResult",
    "inference_gaps", "GapsResult",
]
