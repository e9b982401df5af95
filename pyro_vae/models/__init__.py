"""Tractable latent-variable models whose log p(x) and posterior are exact."""
