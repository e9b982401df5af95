"""Exact resume against real kills: a `pyro-vae train` subprocess is killed with SIGKILL at random
points, once in the middle of writing its state file, and resumed each time with
`pyro-vae train resume=RUN`; the finished run has the numbers of an uninterrupted one, with no
epoch twice in metrics.jsonl or TensorBoard. Subprocesses: marked heavy."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from helpers import ENV, FAST, same_run
from pyro_vae.experiment import train_run
from pyro_vae.rundir import read_config, read_status

ARGS = [*FAST, "train.epochs=30", "train.early_stopping=false", "objective=iwae", "objective.num_particles=2"]

# A `pyro-vae` that, at its second write of state.pt, stops before renaming the fully written
# temporary file (in os.fsync, the last step of the atomic write) and says so in a marker file.
STALL_IN_STATE_WRITE = """
import os, sys, time
real_fsync, written = os.fsync, []
def fsync(fd):
    path = os.readlink(f"/proc/self/fd/{fd}")
    if ".state.pt." in os.path.basename(path):
        written.append(path)
        if len(written) >= 2:
            open(os.path.join(os.path.dirname(path), "writing-state"), "w").close()
            time.sleep(600)
    real_fsync(fd)
os.fsync = fsync
from pyro_vae.cli import main
main(sys.argv[1:])
"""


def start(args, cwd, stall=False):
    code = ["-c", STALL_IN_STATE_WRITE] if stall else ["-m", "pyro_vae.cli"]
    return subprocess.Popen([sys.executable, *code, *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False  # it finished first
        assert time.monotonic() < deadline, "the subprocess did not get there"
        time.sleep(0.02)
    return True


def status(run):
    return read_status(str(run)) or {}


@pytest.mark.heavy
def test_runs_killed_at_random_points_resume_to_the_uninterrupted_numbers(tmp_path):
    run, rng, kills = tmp_path / "run", random.Random(0), []
    targets = sorted(rng.sample(range(2, 27), 3))  # the epochs after which the three random kills come
    for attempt in range(4):
        args = ["train", *ARGS, "hydra.run.dir=run"] if attempt == 0 else ["train", "resume=run"]
        proc = start(args, tmp_path, stall=attempt == 1)
        if attempt == 1:  # killed in the middle of writing state.pt
            started = wait_for(lambda: (run / "writing-state").exists(), proc)
        else:  # killed at a random moment once this process has run past its target epoch
            target = targets.pop(0)
            started = wait_for(lambda: status(run).get("pid") == proc.pid and status(run).get("epoch", 0) >= target,
                               proc)
            time.sleep(rng.uniform(0.0, 0.3))
        if started and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills.append(status(run).get("epoch"))
        proc.communicate(timeout=60)
        if (run / "writing-state").exists():
            assert [f for f in os.listdir(run) if f.startswith(".state.pt.")], "no temporary left by the kill"
            os.unlink(run / "writing-state")
        assert status(run)["status"] in ("interrupted", "finished")  # a killed process reads as interrupted
    assert len(kills) >= 3, kills
    last = subprocess.run([sys.executable, "-m", "pyro_vae.cli", "train", "resume=run"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr
    assert status(run)["status"] == "finished"
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]  # the resume cleared the killed writes
    # the uninterrupted run, in this process (one torch thread, as the subprocesses)
    train_run(read_config(str(run)), str(tmp_path / "ref"), progress=False)
    same_run(str(tmp_path / "ref"), str(run))
