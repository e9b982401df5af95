"""The ``pyro-vae`` command: ``train`` (a Hydra app: overrides, -m sweeps and studies), ``evaluate``, ``gaps``,
``report`` and ``exact``.

    pyro-vae train [KEY=VALUE ...] [-m]                  a new run directory
    pyro-vae train resume=RUN_DIR                        continue a stopped run exactly
    pyro-vae evaluate RUN_DIR [num_samples=K] [data.path=DIR] [device=cuda]
    pyro-vae evaluate RUN_DIR method=ais|bdmc [ais.num_steps=T] [ais.num_chains=M] [num_points=N]
    pyro-vae gaps RUN_DIR [num_points=N] [flexible=true] [ais.num_steps=T]   the inference gap
    pyro-vae train -m +study=NAME seed=0,1,2            a study: every variant x seed (pyro_vae.study)
    pyro-vae report DIR [--by KEY ...]                   the runs under DIR: table and figures
    pyro-vae exact NAME [KEY=VALUE ...] [--out DIR]      a study of an exact model (pyro_vae.studies)

Every mistake (an unknown key or choice, a bad value, a damaged file) is one line on stderr and
exit status 2; Ctrl-C and SIGTERM stop a run cleanly (status 130) and say how to resume it. Under
torchrun (``torchrun ... $(which pyro-vae) train|evaluate ...``) rank 0 reports.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import warnings

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
GROUPS = ("data", "model", "prior", "guide", "likelihood", "objective")
HELP = """usage: pyro-vae COMMAND [ARGS]

commands:
  train     train a model and write its run directory (config, metrics, TensorBoard events,
            figures, checkpoint, summary); KEY=VALUE overrides, -m sweeps, resume=RUN_DIR
            continues a stopped run. `pyro-vae train --help` lists every choice and option.
  evaluate  estimate the test log p(x) of a trained run again, with K importance samples:
            pyro-vae evaluate RUN_DIR num_samples=5000 [data.path=DIR]
            or by annealed importance sampling (method=ais ais.num_steps=T ais.num_chains=M), or
            bound the AIS error by BDMC on simulated data (method=bdmc).
            `pyro-vae evaluate --help` lists its options.
  gaps      the inference gap on N test images: approximation and amortization gaps
            (pyro-vae gaps RUN_DIR num_points=100); `pyro-vae gaps --help` lists its options.
  report    every run under a directory in one table (mean ± SE over seeds per variant) and
            figures: pyro-vae report runs/compare_models [--by KEY ...]
  exact     a study of an exact model, every number checked by a closed form: pyro-vae exact
            linear_gaussian|gaussian_mixture [KEY=VALUE ...] [--out DIR] (pyro_vae/conf/exact/)
studies:    pyro-vae train -m +study=compare_models seed=0,1,2   (pyro_vae/conf/study/; repeat to resume)

data-parallel: torchrun --standalone --nproc_per_node=N $(which pyro-vae) train|evaluate ..."""


def fail(message: str, status: int = 2, every_rank: bool = False) -> None:
    """One line on stderr, exit status 2: the message says what was wrong and what to do. Under
    torchrun only rank 0 says it (every rank meets the same mistake), unless ``every_rank``."""
    _stopping.append("fail")
    if every_rank or int(os.environ.get("RANK", "0")) == 0:
        print(f"pyro-vae: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(status)


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    return f"pyro-vae: warning: {' '.join(str(message).split())}\n"


def group_choices(group: str):
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, group)) if f.endswith(".yaml"))


def check_group_overrides(overrides, where: str = "") -> None:
    """Reject an unknown choice (``prior=vampp``) in one line before Hydra composes anything;
    ``where`` says whose overrides they are (a study's variant)."""
    for arg in overrides:
        match = re.fullmatch(rf"\+?({'|'.join(GROUPS)})=(.*)", arg)
        if match:
            group, values = match.groups()
            for value in values.split(","):  # sweeps: prior=a,b
                if value not in group_choices(group):
                    fail(f"{where}unknown {group} {value!r}; choose one of: {', '.join(group_choices(group))}")


def check_study(argv) -> list:
    """The command line with its study checked whole before any run starts (a typo in the last
    variant would otherwise surface after hours of training the others): the study and variants
    exist, and each variant's overrides compose into a valid config."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import check_config
    from .study import expand_argv, load_study

    try:
        argv = expand_argv(argv)
    except ValueError as e:
        fail(str(e))
    names = [a.split("=", 1)[1] for a in argv if re.fullmatch(r"\+?study=.*", a)]
    if not names:
        return argv
    study = load_study(names[-1])
    variants = [a.split("=", 1)[1] for a in argv if a.startswith("study.variant=")][-1].split(",")
    for variant in variants:
        where = f"study {study['name']}, variant {variant}: "
        check_group_overrides(study["variants"][variant], where)
        try:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose("config", overrides=[f"+study={names[-1]}", *study["variants"][variant]])
            cfg = OmegaConf.to_container(cfg, resolve=True)
            cfg.pop("study"), cfg.pop("resume")
            check_config(cfg)
        except (HydraException, OmegaConfBaseException) as e:
            fail(where + hydra_message(e))
        except ValueError as e:
            fail(where + str(e))
    return argv


def hydra_message(error: Exception) -> str:
    """One line for an error of Hydra's composition (a key not in the config, a malformed override)."""
    cause = error.__cause__
    full_key, parent = getattr(cause, "full_key", None), getattr(cause, "parent_node", None)
    if full_key and parent is not None and "not in struct" in str(cause):
        section = full_key.rpartition(".")[0]
        where = f"the {section} section" if section else "a run config"
        return f"unknown key {full_key}; {where} takes: {', '.join(str(k) for k in parent.keys() if k != 'hydra')}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"bad override ({'; '.join(lines[:2]) or type(error).__name__})"


def summary_line(run_dir: str, summary) -> str:
    """What `pyro-vae train` prints at the end of a run."""
    lp = summary.get("test_log_px")
    log_px = (f"test log p(x) {lp['mean']:.2f} ± {lp['se']:.2f} (K={lp['num_samples']}) nats per image" if lp
              else "test log p(x) skipped (eval.num_samples: null)")
    return f"run {run_dir}: best epoch {summary['best_epoch']}, test ELBO {summary['test_elbo']:.2f}, {log_px}"


def resume_changes(cfg, overrides, saved) -> dict:
    """{dotted key: new value} for each command-line override whose value differs from the run's."""
    def get(c, key):
        for part in key.split("."):
            c = c.get(part) if isinstance(c, dict) else None
        return c

    keys = {re.split(r"[=@]", arg.lstrip("+~"), maxsplit=1)[0] for arg in overrides}
    return {key: get(cfg, key) for key in sorted(keys - {"resume"}) if get(cfg, key) != get(saved, key)}


_stopping = []  # set once pyro-vae has decided to stop: later signals are ignored


def _interrupt(signum, frame):
    """SIGTERM as Ctrl-C, once; ignored while a stop is being handled (a lost rank, an error),
    so the run's status and its one-line message are written whole."""
    from .distributed import RankLost

    if _stopping or isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit, RankLost)):
        return
    _stopping.append(signum)
    raise KeyboardInterrupt("Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name)


def _train(argv) -> None:
    import hydra
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .distributed import RankLost, teardown
    from .experiment import RunFinished, RunInterrupted, resume_run, train_run
    from .rundir import read_config, remove_if_empty
    from .study import RunSkipped, run_in, run_name, variant_overrides
    from .train import TrainingDiverged

    check_group_overrides(argv)
    argv = check_study(argv)

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def app(cfg) -> None:
        hydra_dir = HydraConfig.get().runtime.output_dir  # made by Hydra; a run claims it, or a free neighbour
        overrides = list(HydraConfig.get().overrides.task)
        cfg = OmegaConf.to_container(cfg, resolve=True)
        resume, study = cfg.pop("resume"), cfg.pop("study", None)
        try:
            if study:  # a study's job: its variant's config, in its own directory (pyro_vae.study)
                if resume:
                    fail("resume= does not go with +study=: repeat the study's command, which resumes its "
                         "interrupted runs")
                composed = variant_overrides(study, overrides)
                cfg = OmegaConf.to_container(compose("config", overrides=composed), resolve=True)
                cfg.pop("resume"), cfg.pop("study")
                run_dir = os.path.join(study["dir"], study["variant"], run_name(cfg, overrides))
                summary = run_in(cfg, run_dir, composed, progress=cfg["progress"])
            elif resume:
                summary = resume_run(resume, changes=resume_changes(cfg, overrides, read_config(resume)))
            else:
                summary = train_run(cfg, hydra_dir, progress=cfg["progress"], overrides=overrides)
        except (RunFinished, RunSkipped) as e:
            print(e)
            return
        except RunInterrupted as e:
            fail(str(e), status=130)
        except (ValueError, FileNotFoundError, TrainingDiverged) as e:
            fail(str(e))
        except RankLost as e:
            fail(str(e), every_rank=True)
        finally:
            remove_if_empty(hydra_dir)
            teardown()
        if int(os.environ.get("RANK", "0")) == 0:
            print(summary_line(summary["run_dir"], summary))

    sys.argv = [sys.argv[0], *argv]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing a traceback: told in one line
    try:
        app()
    except (HydraException, OmegaConfBaseException) as e:
        fail(hydra_message(e))


def _report(argv) -> None:
    from .report import markdown, report

    parser = argparse.ArgumentParser(prog="pyro-vae report", description="every run under DIR in one table: "
                                     "mean ± standard error over seeds per variant, and figures")
    parser.add_argument("dir", help="a directory of runs (a study's study.dir, a -m sweep's directory)")
    parser.add_argument("--by", nargs="+", metavar="KEY", help="the config keys that tell variants apart "
                        "(default: every key that differs, the seed excepted)")
    parser.add_argument("--out", help="where report.md, report.csv and the figures go (default: DIR)")
    parser.error = fail
    args = parser.parse_args(argv)
    try:
        df, keys = report(args.dir, args.by, args.out)
    except ValueError as e:
        fail(str(e))
    print(markdown(df, keys))
    print(f"written: {os.path.join(args.out or args.dir, 'report.md')}, report.csv, report_curves.png, "
          f"report_log_px_vs_k.png")


def _exact(argv) -> None:
    from .studies import exact_study_names, run_exact_study

    parser = argparse.ArgumentParser(prog="pyro-vae exact", description="a study of an exact model (a closed-form "
                                     "log p(x) checks every number): writes results.md, results.json and figures")
    parser.add_argument("name", help=f"one of: {', '.join(exact_study_names())}")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (pyro_vae/conf/exact/)")
    parser.add_argument("--out", help="where its files go (default runs/NAME)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.error = fail
    args = parser.parse_args(argv)
    try:
        run_exact_study(args.name, args.overrides, args.out, progress=not args.no_progress)
    except ValueError as e:
        fail(str(e))
    out = args.out or os.path.join("runs", args.name)
    print(open(os.path.join(out, "results.md")).read())
    print(f"written: {os.path.join(out, 'results.md')}, results.json and the figures beside them")


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .cli_evaluate import evaluate, gaps

    commands = {"train": _train, "evaluate": evaluate, "gaps": gaps, "report": _report, "exact": _exact}
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return
    if argv[0] not in commands:
        fail(f"unknown command {argv[0]!r}; choose one of: {', '.join(commands)}")
    saved = (warnings.formatwarning, signal.getsignal(signal.SIGTERM), os.environ.get("HYDRA_FULL_ERROR"),
             signal.getsignal(signal.SIGINT))
    warnings.formatwarning = _one_line_warnings
    signal.signal(signal.SIGTERM, _interrupt)  # torchrun and schedulers stop with SIGTERM: stop like Ctrl-C
    if saved[3] is signal.default_int_handler:  # Ctrl-C, unless the caller ignores it (a background job)
        signal.signal(signal.SIGINT, _interrupt)
    try:
        commands[argv[0]](argv[1:])
    except KeyboardInterrupt:  # outside a run (train: before its directory is claimed, or after its status)
        fail(f"{argv[0]} interrupted", status=130)
    finally:  # as they were, for a caller in the same process
        warnings.formatwarning = saved[0]
        signal.signal(signal.SIGTERM, saved[1])
        signal.signal(signal.SIGINT, saved[3])
        _stopping.clear()
        if saved[2] is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved[2]


if __name__ == "__main__":
    main()
