"""Helpers shared by the run tests: a small run config and the ``pyro-vae`` command in a subprocess."""

import json
import os
import subprocess
import sys

import torch

from pyro_vae.checkpoint import load_checkpoint

# The CLI's fastest complete run: tiny networks on digits, two epochs, K = 10.
FAST = ["train.epochs=2", "model.hidden=[16]", "model.latent_dim=2", "eval.num_samples=10", "progress=false"]
# One torch thread in every subprocess, as in this process (tests/conftest.py): the same numbers.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_config(**sections):
    """A run config of tiny networks on digits; ``sections`` update its sections (or replace a value)."""
    cfg = {"seed": 3, "data": {"name": "digits", "path": None, "val_fraction": 0.1},
           "model": {"latent_dim": 2, "hidden": [8], "activation": "tanh"},
           "prior": {"name": "standard_normal"}, "guide": {"name": "diagonal_normal"},
           "likelihood": {"name": "bernoulli"}, "objective": {"name": "elbo"},
           "train": {"epochs": 3, "batch_size": 100, "lr": 3e-3, "patience": 2}, "eval": {"num_samples": 7}}
    for name, values in sections.items():
        cfg[name] = {**cfg[name], **values} if isinstance(values, dict) else values
    return cfg


def pyro_vae(*args, cwd, timeout=300):
    """Run ``pyro-vae ARGS`` in ``cwd``; returns the CompletedProcess (text stdout and stderr)."""
    return subprocess.run([sys.executable, "-m", "pyro_vae.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def one_line_error(out, *fragments, status=2):
    """Assert the command failed with ``status`` and one line on stderr containing every fragment,
    and no traceback."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == status, (out.returncode, out.stderr)
    assert len(lines) == 1 and lines[0].startswith("pyro-vae: error: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def no_run_left(root):
    """True if no file was written under ``root``/runs (Hydra's empty parents may remain)."""
    return not [f for _, _, files in os.walk(os.path.join(root, "runs")) for f in files]


def tensorboard_steps(run_dir):
    """{tag: [steps]} over every events file of the run, in file order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = {}
    directory = os.path.join(run_dir, "tensorboard")
    for name in sorted(os.listdir(directory)):
        for event in EventFileLoader(os.path.join(directory, name)).Load():
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def same_run(a, b):
    """Two run directories hold the same numbers: summary (but its timing), every metrics line,
    the checkpoint's tensors and metadata, and TensorBoard steps with no epoch twice."""
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (a, b))
    assert {k: v for k, v in sa.items() if k != "train_seconds"} == {k: v for k, v in sb.items() if k != "train_seconds"}
    assert open(os.path.join(a, "metrics.jsonl")).read() == open(os.path.join(b, "metrics.jsonl")).read()
    (state_a, meta_a), (state_b, meta_b) = (load_checkpoint(os.path.join(d, "checkpoint.pt")) for d in (a, b))
    assert meta_a == meta_b and state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    epochs = list(range(1, sa["epochs_run"] + 1))
    assert all(steps == epochs for steps in tensorboard_steps(b).values())
    assert tensorboard_steps(a) == tensorboard_steps(b)
