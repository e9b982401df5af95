"""pyro-vae: variational autoencoders on Pyro, written the way the textbook derives them."""

from .build import build_objective, build_model
from .data import load_dataset
from .marginal import LogPxEstimate, estimate_log_px
from .train import TrainConfig, fit
from .vae import VAE

__all__ = ["VAE", "estimate_log_px", "LogPxEstimate", "build_model", "build_objective", "load_dataset", "fit", "TrainConfig"]
