"""The ``pyro-vae`` command: ``train`` (a Hydra app: overrides and -m sweeps) and ``evaluate``.

    pyro-vae train [KEY=VALUE ...] [-m]
    pyro-vae evaluate RUN_DIR [--num-samples K | num_samples=K]
"""

from __future__ import annotations

import argparse
import os
import re
import sys

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
GROUPS = ("data", "model", "prior", "guide", "likelihood", "objective")
USAGE = __doc__.strip().splitlines()[-2:]


def fail(message: str) -> None:
    """One line on stderr, exit status 2: the message says what was wrong and what to do."""
    print(f"pyro-vae: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def group_choices(group: str):
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith(".yaml"))


def check_group_overrides(overrides) -> None:
    """Reject an unknown choice (``prior=vampp``) in one line before Hydra composes anything."""
    for arg in overrides:
        match = re.fullmatch(rf"\+?({'|'.join(GROUPS)})=(.*)", arg)
        if match:
            group, values = match.groups()
            for value in values.split(","):  # sweeps: prior=a,b
                if value not in group_choices(group):
                    fail(f"unknown {group} {value!r}; choose one of: {', '.join(group_choices(group))}")


def summary_line(run_dir: str, summary) -> str:
    """What `pyro-vae train` prints at the end of a run."""
    lp = summary.get("test_log_px")
    log_px = (f"test log p(x) {lp['mean']:.2f} ± {lp['se']:.2f} (K={lp['num_samples']}) nats per image" if lp
              else "test log p(x) skipped (eval.num_samples: null)")
    return f"run {run_dir}: best epoch {summary['best_epoch']}, test ELBO {summary['test_elbo']:.2f}, {log_px}"


def _train(argv) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from .checkpoint import atomic_write_text
    from .experiment import train_run
    from .train import TrainingDiverged

    check_group_overrides(argv)

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def app(cfg) -> None:
        run_dir = HydraConfig.get().runtime.output_dir
        atomic_write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(cfg, resolve=True))
        try:
            summary = train_run(OmegaConf.to_container(cfg, resolve=True), run_dir, progress=cfg.progress)
        except (ValueError, FileNotFoundError, TrainingDiverged) as e:
            fail(str(e))
        print(summary_line(run_dir, summary))

    sys.argv = [sys.argv[0], *argv]
    app()


def _evaluate(argv) -> None:
    from .evaluation import evaluate_run

    parser = argparse.ArgumentParser(prog="pyro-vae evaluate", description="estimate test log p(x) of a run")
    parser.add_argument("run_dir")
    parser.add_argument("--num-samples", type=int, default=5000, help="importance samples K (default 5000)")
    parser.add_argument("--no-progress", action="store_true")
    # Hydra-style key=value, as in `pyro-vae evaluate RUN_DIR num_samples=5000`
    argv = [f"--{a.split('=', 1)[0].replace('_', '-')}={a.split('=', 1)[1]}" if re.fullmatch(r"\w+=.*", a)
            else a for a in argv]
    args = parser.parse_args(argv)
    try:
        r = evaluate_run(args.run_dir, args.num_samples, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    print(f"test log p(x) = {r['log_px']['mean']:.3f} ± {r['log_px']['se']:.3f} nats (K={r['num_samples']}, "
          f"{r['num_test']} images); ELBO = {r['elbo']['mean']:.3f} ± {r['elbo']['se']:.3f}; "
          f"gap log p(x) - ELBO = {r['gap']:.3f}")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": _train, "evaluate": _evaluate}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage:\n  " + "\n  ".join(USAGE))
        return
    if argv[0] not in commands:
        fail(f"unknown command {argv[0]!r}; choose one of: {', '.join(commands)}")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
