"""``pyro-vae evaluate`` and ``pyro-vae gaps``: log p(x) of a trained run by importance sampling,
AIS or BDMC bounds, and its inference gap. Their options are argparse flags; ``key=value`` and
``ais.key=value`` (the Hydra spelling of ``train``) are accepted too, and ``data.KEY=VALUE`` points
the run at its data moved, or at another dataset of the same image size."""

from __future__ import annotations

import argparse
import os
import re

from .cli import fail


def _key_values(argv):
    """(data overrides, argv): ``data.KEY=VALUE`` pulled out (the run's data, moved or another of
    the same image size), and Hydra-style ``key=value`` / ``ais.key=value`` made ``--key=value``."""
    data = {a.split("=", 1)[0][5:]: _yaml_value(a.split("=", 1)[1]) for a in argv if a.startswith("data.") and "=" in a}
    argv = [a for a in argv if not (a.startswith("data.") and "=" in a)]
    argv = [f"--{a.split('=', 1)[0].replace('_', '-')}={a.split('=', 1)[1]}" if re.fullmatch(r"[\w.]+=.*", a)
            else a for a in argv]
    return data, argv


def _ais_arguments(parser, steps: int, chains: int, leapfrog: bool = True) -> None:
    parser.add_argument("--ais.num-steps", dest="num_steps", type=int, default=steps,
                        help=f"AIS steps T, one HMC transition each (default {steps})")
    parser.add_argument("--ais.num-chains", dest="num_chains", type=int, default=chains,
                        help=f"AIS chains M per image (default {chains})")
    if leapfrog:
        parser.add_argument("--ais.num-leapfrog", dest="num_leapfrog", type=int, default=10,
                            help="leapfrog steps per HMC transition (default 10)")
    parser.add_argument("--ais.start", dest="start", choices=("guide", "prior"), default="guide",
                        help="where the chains start: the guide q(z|x) (default) or the prior p(z)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the run's)")
    parser.add_argument("--no-progress", action="store_true")
    parser.error = fail


def evaluate(argv) -> None:
    from .distributed import teardown
    from .evaluation import evaluate_ais_run, evaluate_run

    parser = argparse.ArgumentParser(
        prog="pyro-vae evaluate", description="estimate test log p(x) of a run: importance sampling (method=is), "
        "annealed importance sampling (method=ais) or BDMC bounds on simulated data (method=bdmc); each adds its "
        "figures to the run's evaluation.json, ais and bdmc also to figures/log_px_vs_steps.png")
    parser.add_argument("run_dir")
    parser.add_argument("--method", choices=("is", "ais", "bdmc"), default="is", help="default is")
    parser.add_argument("--num-samples", type=int, default=5000,
                        help="importance samples K (default 5000; with method=ais: the IS it is compared with)")
    parser.add_argument("--num-points", type=int, default=None,
                        help="ais: the first N test images (default all); bdmc: N simulated images (default 100)")
    _ais_arguments(parser, 1000, 16)
    data, argv = _key_values(argv)
    args = parser.parse_args(argv)
    try:
        if args.method == "is":
            if args.num_points is not None:
                raise ValueError("num_points is an option of method=ais and method=bdmc; method=is uses every test image")
            r = evaluate_run(args.run_dir, args.num_samples, progress=not args.no_progress, data=data,
                             device=args.device)
        else:
            r = evaluate_ais_run(args.run_dir, args.method, args.num_steps, args.num_chains, args.num_points,
                                 args.num_samples, args.num_leapfrog, args.start, not args.no_progress, data,
                                 args.device)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    finally:
        teardown()
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun rank 0 reports
        return
    if args.method == "is":
        print(f"test log p(x) = {r['log_px']['mean']:.3f} ± {r['log_px']['se']:.3f} nats (K={r['num_samples']}, "
              f"{r['num_test']} images); ELBO = {r['elbo']['mean']:.3f} ± {r['elbo']['se']:.3f}; "
              f"gap log p(x) - ELBO = {r['gap']:.3f}")
    elif args.method == "ais":
        k = str(r["is_num_samples"])
        print(f"AIS test log p(x) = {r['log_px']['mean']:.3f} ± {r['log_px']['se']:.3f} nats (T={r['num_steps']}, "
              f"M={r['num_chains']}, {r['num_points']} images); IS K={k} on the same images "
              f"{r['is_log_px_by_k'][k]['mean']:.3f}; AIS - IS = {r['ais_minus_is']['mean']:.3f} ± "
              f"{r['ais_minus_is']['se']:.3f}; acceptance {r['accept_rate']:.2f}")
    else:
        print(f"BDMC on {r['num_points']} simulated images (T={r['num_steps']}, M={r['num_chains']}): "
              f"lower {r['lower']['mean']:.3f}, upper {r['upper']['mean']:.3f}, gap {r['gap']['mean']:.3f} ± "
              f"{r['gap']['se']:.3f} nats")


def gaps(argv) -> None:
    from .evaluation import gaps_run

    parser = argparse.ArgumentParser(
        prog="pyro-vae gaps", description="the inference gap of a trained VAE on its first N test images: log p(x) "
        "by AIS, the ELBO of the amortized guide and of the best guide of its family per image; writes gaps.json "
        "and figures/gaps.png into the run directory")
    parser.add_argument("run_dir")
    parser.add_argument("--num-points", type=int, default=100, help="test images N (default 100)")
    parser.add_argument("--flexible", action="store_true", help="also a full-covariance Gaussian per image")
    parser.add_argument("--opt-steps", type=int, default=3000, help="most Adam steps per image (default 3000)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's step size (default 0.01)")
    parser.add_argument("--no-stl", dest="stl", action="store_false",
                        help="the full reparameterized gradient instead of sticking the landing (for flow guides)")
    _ais_arguments(parser, 1000, 16, leapfrog=False)
    data, argv = _key_values(argv)
    flags = {"--flexible=true": "--flexible", "--flexible=false": None, "--stl=false": "--no-stl", "--stl=true": None}
    argv = [flags.get(a.lower(), a) for a in argv if flags.get(a.lower(), a) is not None]
    args = parser.parse_args(argv)
    try:
        r = gaps_run(args.run_dir, args.num_points, args.num_steps, args.num_chains, args.flexible,
                     not args.no_progress, data, args.device, opt_steps=args.opt_steps, lr=args.lr, stl=args.stl,
                     start=args.start)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    rows = [("log p(x) (AIS)", "log_px"), ("ELBO, amortized guide", "elbo_amortized"),
            ("ELBO, best of the family per image", "elbo_optimized"), ("approximation gap", "approximation_gap"),
            ("amortization gap", "amortization_gap"), ("inference gap (sum)", "inference_gap")]
    if args.flexible:
        rows += [("ELBO, full covariance per image", "elbo_flexible"),
                 ("approximation gap, full covariance", "approximation_gap_flexible")]
    print(f"{r['num_points']} test images, AIS T={r['num_steps']} M={r['num_chains']} (nats per image, mean ± s.e.)")
    for label, key in rows:
        print(f"  {label:40s} {r[key]['mean']:9.3f} ± {r[key]['se']:.3f}")


def _yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)
