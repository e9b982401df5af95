"""The inference-gap study: IS against AIS, BDMC, and the gaps, on six mnist5k models of the
compare_models study, through the `pyro-vae` commands (results.md has the story and the tables).

    pyro-vae train -m +study=compare_models seed=0 study.dir=runs/inference_gap \
        study.variant=vae,iwae_k5,iwae_k50,mixture_prior,iaf_guide,full_cov_guide   # runs/inference_gap/<variant>/seed=0
    python experiments/inference_gap/run.py bdmc [VARIANT ...]   # BDMC gap against T on simulated data
    python experiments/inference_gap/run.py ais [VARIANT ...]    # AIS against T beside IS-5000, test subset
    python experiments/inference_gap/run.py gaps [VARIANT ...]   # the gaps on the test subset, AIS at T = 1000
    python experiments/inference_gap/run.py table                # markdown tables from the runs' JSON files

Each command runs `pyro-vae evaluate|gaps` once per variant and setting (one torch thread, nice);
a setting already in a run's evaluation.json (or gaps.json) is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

RUNS = os.environ.get("RUNS", "runs/inference_gap")
VARIANTS = ["vae", "iwae_k5", "iwae_k50", "mixture_prior", "iaf_guide", "full_cov_guide"]
BDMC = {"steps": [10, 30, 100, 300], "chains": 4, "points": 50}
AIS = {"steps": [10, 30, 100, 300], "chains": 4, "points": 100, "is_samples": 5000}  # T = 1000: gaps.json
GAPS = {"steps": 1000, "chains": 4, "points": 100, "flexible": True}  # the AIS images


def start(variant):
    """AIS from the prior for the IAF model: from its guide, every leapfrog step would invert the flow
    (BDMC at T = 10 took 118 s against 4 s for the VAE)."""
    return ["ais.start=prior"] if variant == "iaf_guide" else []


def pyro_vae(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["nice", "-n", "10", sys.executable, "-m", "pyro_vae.cli", *args, "--no-progress"]
    print("$ pyro-vae " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env=env)


def run_dir(variant):
    return os.path.join(RUNS, variant, "seed=0")


def evaluation(variant):
    path = os.path.join(run_dir(variant), "evaluation.json")
    return json.load(open(path)) if os.path.isfile(path) else {}


def done(variant, method, T, M, n):
    return any((e["num_steps"], e["num_chains"], e["num_points"]) == (T, M, n)
               for e in evaluation(variant).get(method, []))


def chosen_steps(variant):
    """The smallest T of the BDMC grid whose gap on simulated data is below 1 nat, mean + 2 s.e.
    (None if none is)."""
    entries = sorted(evaluation(variant).get("bdmc", []), key=lambda e: e["num_steps"])
    below = [e["num_steps"] for e in entries if e["gap"]["mean"] + 2 * e["gap"]["se"] < 1.0]
    return below[0] if below else None


def run_bdmc(variant):
    for T in BDMC["steps"]:
        if not done(variant, "bdmc", T, BDMC["chains"], BDMC["points"]):
            pyro_vae("evaluate", run_dir(variant), "method=bdmc", f"ais.num_steps={T}",
                     f"ais.num_chains={BDMC['chains']}", f"num_points={BDMC['points']}", *start(variant))


def run_ais(variant):
    for T in AIS["steps"]:
        if not done(variant, "ais", T, AIS["chains"], AIS["points"]):
            pyro_vae("evaluate", run_dir(variant), "method=ais", f"ais.num_steps={T}",
                     f"ais.num_chains={AIS['chains']}", f"num_points={AIS['points']}",
                     f"num_samples={AIS['is_samples']}", *start(variant))


def run_gaps(variant):
    T = GAPS["steps"]
    path = os.path.join(run_dir(variant), "gaps.json")
    if os.path.isfile(path) and json.load(open(path))["num_steps"] == T and "log_px_reused" in json.load(open(path)):
        return  # done (gaps.json of the first version, without log_px_reused, had Adam at one fixed step size)
    pyro_vae("gaps", run_dir(variant), f"num_points={GAPS['points']}", f"ais.num_steps={T}",
             f"ais.num_chains={GAPS['chains']}", *(["flexible=true"] if GAPS["flexible"] else []),
             *(["stl=false"] if variant == "iaf_guide" else []), *start(variant))  # STL would invert the flow at every step


def fmt(v):
    return f"{v['mean']:.2f} ± {v['se']:.2f}"


def gaps(variant):
    path = os.path.join(run_dir(variant), "gaps.json")
    return json.load(open(path)) if os.path.isfile(path) else None


def table():
    K = str(AIS["is_samples"])
    print(f"| variant | BDMC gap, simulated (T = {', '.join(map(str, BDMC['steps']))}) | T (gap + 2 s.e. < 1) | "
          f"IS-{K} | " + " | ".join(f"AIS T={t}" for t in AIS["steps"]) + f" | AIS T={GAPS['steps']} | "
          f"AIS T={GAPS['steps']} − IS-{K} | acceptance (T={max(AIS['steps'])}) |")
    print("|---" * (6 + len(AIS["steps"])) + "|")
    for v in VARIANTS:
        ev, g = evaluation(v), gaps(v)
        if not ev.get("ais"):
            continue
        bdmc = {e["num_steps"]: e["gap"] for e in ev.get("bdmc", [])}
        ais = {e["num_steps"]: e for e in ev["ais"] if e["num_points"] == AIS["points"]}
        is_k = ais[max(ais)]["is_log_px_by_k"][K]
        final = g and g["num_points"] == AIS["points"] and g["log_px"]
        diff = (f"{final['mean'] - is_k['mean']:+.2f}" if final else "–")
        print(f"| {v} | " + " / ".join(f"{bdmc[t]['mean']:.2f} ± {bdmc[t]['se']:.2f}" for t in sorted(bdmc))
              + f" | {chosen_steps(v) or '> ' + str(max(BDMC['steps']))} | {fmt(is_k)} | "
              + " | ".join(f"{ais[t]['ais_minus_is']['mean'] + is_k['mean']:.2f}" if t in ais else "–"
                           for t in AIS["steps"])
              + f" | {fmt(final) if final else '–'} | {diff} | {ais[max(ais)]['accept_rate']:.2f} |")
    print()
    print("| variant | log p(x), AIS | ELBO, amortized | ELBO, q* per image | ELBO, full cov. per image | "
          "approximation gap | amortization gap | inference gap | approx. gap, full cov. | minutes |")
    print("|---" * 10 + "|")
    for v in VARIANTS:
        g = gaps(v)
        if g is None:
            continue
        flex = [fmt(g[k]) if k in g else "–" for k in ("elbo_flexible", "approximation_gap_flexible")]
        print(f"| {v} | {fmt(g['log_px'])} | {fmt(g['elbo_amortized'])} | {fmt(g['elbo_optimized'])} | {flex[0]} "
              f"| {fmt(g['approximation_gap'])} | {fmt(g['amortization_gap'])} | {fmt(g['inference_gap'])} "
              f"| {flex[1]} | {g['seconds'] / 60:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("bdmc", "ais", "gaps", "table"))
    parser.add_argument("variants", nargs="*", default=VARIANTS)
    args = parser.parse_args()
    if args.step == "table":
        return table()
    for v in args.variants:
        {"bdmc": run_bdmc, "ais": run_ais, "gaps": run_gaps}[args.step](v)


if __name__ == "__main__":
    main()
