"""Data-parallel training and evaluation with 2 gloo ranks under torchrun, against one process:
one global batch's gradient (fixed draws), the sharded evaluation point by point, a short digits
run's test numbers, and a run whose rank is killed, resumed to the uninterrupted numbers. Bad
input: more ranks than a batch has points, a port in use, a resume with another number of ranks.
Subprocesses: marked heavy."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from helpers import ENV, FAST, no_run_left, one_line_error, same_run
from pyro_vae.distributed import SINGLE, derive_seed
from pyro_vae.experiment import resume_run, train_run
from pyro_vae.rundir import read_config, read_status

pytestmark = [pytest.mark.heavy, pytest.mark.skipif(not dist.is_gloo_available(), reason="no gloo backend")]
TESTS = os.path.dirname(os.path.abspath(__file__))
ARGS = [*FAST, "train.epochs=12", "train.early_stopping=false", "train.batch_size=50"]


def torchrun(*args, cwd, nproc=2, script=("-m", "pyro_vae.cli"), popen=False):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script, *args]
    env = {**ENV, "PYTHONPATH": os.pathsep.join([os.path.dirname(TESTS), ENV.get("PYTHONPATH", "")])}
    if popen:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("worker") / "out.pt"
    done = torchrun(str(out), cwd=TESTS, script=(os.path.join(TESTS, "distributed_worker.py"),))
    assert done.returncode == 0, done.stderr
    return torch.load(out, weights_only=True)


def test_one_global_batch_has_the_gradient_of_one_process(worker):
    """59 points in one batch, shards of 30 and 29, fixed draws: the gradients summed over the two
    ranks are the single process's, to float rounding."""
    import distributed_worker

    assert worker["world_size"] == 2
    single = distributed_worker.batch_gradient(SINGLE)
    assert single.keys() == worker["gradient"].keys()
    for name, grad in single.items():
        assert grad.abs().max() > 0, name  # every parameter takes part
        torch.testing.assert_close(worker["gradient"][name], grad, rtol=1e-5, atol=1e-6)


def test_the_sharded_evaluation_equals_one_process_point_by_point(worker):
    """Blocks of points seeded by their first index, not by rank: 2 ranks give one process's
    per-image estimates exactly."""
    import distributed_worker

    single, sharded = distributed_worker.sharded_evaluation(SINGLE), worker["evaluation"]
    assert torch.equal(sharded["log_px"], single["log_px"]) and torch.equal(sharded["ess"], single["ess"])
    assert all(torch.equal(sharded["log_px_by_k"][k], v) for k, v in single["log_px_by_k"].items())
    assert sharded["elbo"] == single["elbo"] and len(single["log_px"]) == 359


def test_seeds_of_blocks_and_ranks_are_distinct():
    seeds = {derive_seed(0, *keys) for keys in [(1,), (2, 0), (2, 1), (3, 1, 0), (3, 1, 1), (3, 2, 0), (4,)]}
    assert len(seeds) == 7 and derive_seed(0, 2, 1) != derive_seed(1, 2, 0)


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_a_data_parallel_run_matches_one_process_and_resumes_after_a_rank_is_killed(tmp_path):
    whole = torchrun("train", *ARGS, "hydra.run.dir=ddp", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.count("run ") == 1  # rank 0 alone reports
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    one = train_run(read_config(str(tmp_path / "ddp")), str(tmp_path / "single"), progress=False)
    assert (ddp["world_size"], one["world_size"], read_status(str(tmp_path / "ddp"))["world_size"]) == (2, 1, 2)
    a, b = ddp["test_log_px"], one["test_log_px"]  # the same objective, other draws: equal within noise
    assert abs(a["mean"] - b["mean"]) < 3 * (a["se"] ** 2 + b["se"] ** 2) ** 0.5, (a, b)

    proc = torchrun("train", *ARGS, "hydra.run.dir=killed", cwd=tmp_path, popen=True)
    deadline = time.monotonic() + 300
    while (read_status(str(tmp_path / "killed")) or {}).get("epoch", 0) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    rank0 = read_status(str(tmp_path / "killed"))["pid"]
    os.kill(next(p for p in children(proc.pid) if p != rank0), signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    ours = [line for line in err.splitlines() if line.startswith("pyro-vae: error:")]
    # rank 0 sees its peer gone in a collective, or torchrun's SIGTERM first: either way one line
    assert len(ours) == 1 and ("rank 0 of 2 lost the other ranks" in ours[0] or "stopped by SIGTERM" in ours[0]), err
    assert ours[0].endswith(f"continue with `torchrun --nproc_per_node=2 $(which pyro-vae) train "
                            f"resume={tmp_path / 'killed'}`")
    assert read_status(str(tmp_path / "killed"))["status"] == "interrupted"
    with pytest.raises(ValueError, match=r"the state was written by a training on 2 rank\(s\), this one has 1; "
                                         r"resume it with torchrun --nproc_per_node=2"):
        resume_run(str(tmp_path / "killed"))
    assert read_status(str(tmp_path / "killed"))["status"] == "interrupted"  # the refusal changed nothing
    resumed = torchrun("train", "resume=killed", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    same_run(str(tmp_path / "ddp"), str(tmp_path / "killed"))
    # `pyro-vae evaluate` shards too, and repeats the run's own evaluation phase
    evaluated = torchrun("evaluate", str(tmp_path / "ddp"), "num_samples=10", "--no-progress", cwd=tmp_path)
    assert evaluated.returncode == 0 and evaluated.stdout.count("test log p(x) =") == 1, evaluated.stderr
    result = json.loads((tmp_path / "ddp" / "evaluation.json").read_text())
    assert result["log_px"] == {k: ddp["test_log_px"][k] for k in ("mean", "se")}


def test_more_ranks_than_points_in_a_batch_is_one_line(tmp_path):
    out = torchrun("train", *FAST, "train.batch_size=2", cwd=tmp_path, nproc=3)
    ours = [line for line in out.stderr.splitlines() if line.startswith("pyro-vae: error:")]
    assert out.returncode != 0 and len(ours) == 1, out.stderr
    assert "3 ranks but train.batch_size=2" in ours[0] and "use fewer processes" in ours[0]
    assert no_run_left(tmp_path)


def test_a_port_in_use_is_one_line(tmp_path):
    """A rank started by hand (RANK, WORLD_SIZE, MASTER_PORT set) on a port another program holds."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(busy.getsockname()[1])}
        out = subprocess.run([sys.executable, "-m", "pyro_vae.cli", "train", *FAST], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    one_line_error(out, "torch.distributed could not form the group of 2 ranks", "address already in use",
                   "--master_addr/--master_port")
    assert no_run_left(tmp_path)
