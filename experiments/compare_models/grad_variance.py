"""Variance of the standard, STL and DReG gradient estimators of the IWAE bound on the
linear-Gaussian model (D=4, d=2, a guide 1 posterior sd off in mean and 1.5x too wide), per data
point, summed over the guide's parameters (A, c, L) and for the model offset b; 3000 draws each.
Writes grad_variance.md. Uses the same draws as tests/test_objectives.py::gradient_draws."""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
from test_objectives import gradient_draws  # noqa: E402

from pyro_vae.exact.linear_gaussian import LinearGaussian  # noqa: E402

torch.set_default_dtype(torch.float64)
lg = LinearGaussian.random(D=4, d=2, sigma=0.5, seed=0)
lines = ["| K | estimator | guide grad variance (sum over A, c, L) | model grad variance (b) | guide grad mean shift vs standard (max |z|) |",
         "|---|---|---|---|---|"]
for K in (1, 5, 50):
    standard = gradient_draws(lg, "standard", K, seed=1)
    for estimator in ("standard", "stl", "dreg"):
        g = standard if estimator == "standard" else gradient_draws(lg, estimator, K, seed=2)
        se = (standard.var(0) / len(standard) + g.var(0) / len(g)).sqrt()
        z = ((g.mean(0) - standard.mean(0)) / se)[:13].abs().max().item() if estimator != "standard" else 0.0
        lines.append(f"| {K} | {estimator} | {g.var(0)[:13].sum().item():.4g} | {g.var(0)[13:].sum().item():.4g} | {z:.1f} |")
open(os.path.join(HERE, "grad_variance.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
