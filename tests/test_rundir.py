"""Run directories: claimed by one run only (also when many start at once), the status a run
leaves in it, and the permissions of what is written there."""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from pyro_vae import rundir
from pyro_vae.checkpoint import atomic_write_text


def _claim(base, queue):
    queue.put((os.getpid(), rundir.claim(base)))


def test_runs_claiming_one_name_at_once_each_get_their_own(tmp_path):
    base = str(tmp_path / "runs" / "same-second")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(base, queue)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    claims = dict(queue.get(timeout=5) for _ in procs)
    assert sorted(claims.values()) == sorted([base] + [f"{base}-{k}" for k in range(1, 6)])
    for pid, path in claims.items():  # each directory's status names the process that claimed it
        assert json.loads(open(os.path.join(path, "status.json")).read())["pid"] == pid
    assert not [f for d in claims.values() for f in os.listdir(d) if f != "status.json"]  # no temporaries


def test_a_directory_holding_a_run_is_taken_even_without_a_status(tmp_path):
    old = tmp_path / "run"
    old.mkdir()
    (old / "checkpoint.pt").write_bytes(b"an older run's")
    assert rundir.claim(str(old)) == str(tmp_path / "run-1")
    empty = tmp_path / "empty"  # made by Hydra for this run, say
    empty.mkdir()
    assert rundir.claim(str(empty)) == str(empty)


def test_status_round_trip_and_a_dead_process_reads_as_interrupted(tmp_path):
    run = rundir.claim(str(tmp_path / "run"))
    assert rundir.read_status(run)["status"] == "running"
    rundir.write_status(run, "failed", message="it broke", epoch=3)
    rundir.write_status(run, "interrupted", epoch=4)
    status = rundir.read_status(run)
    assert (status["status"], status["epoch"], "message" in status) == ("interrupted", 4, False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {**status, "status": "running", "pid": int(dead.stdout)}
    atomic_write_text(os.path.join(run, "status.json"), json.dumps(record))
    status = rundir.read_status(run)
    assert status["status"] == "interrupted" and "ended without saying why: it was killed" in status["message"]
    with pytest.raises(ValueError, match="status must be one of running, finished, failed, interrupted, got 'done'"):
        rundir.write_status(run, "done")
    assert rundir.read_status(str(tmp_path)) is None


def test_only_interrupted_writes_are_cleaned_up(tmp_path):
    (tmp_path / ".state.pt.0123abcd.tmp").write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("the user's")
    rundir.remove_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == ["notes.tmp"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write_text(str(tmp_path / "summary.json"), "{}")
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "summary.json").st_mode & 0o777 == mode
