"""Checkpoints: round trip, atomic writes, and refusal of pickled objects."""

import os
import re

import pytest
import torch

from pyro_vae.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip(tiny_vae, tmp_path):
    vae = tiny_vae()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, vae.state_dict(), epoch=3, config={"seed": 1})
    state, meta = load_checkpoint(path)
    other = tiny_vae()
    other.load_state_dict(state)
    x = torch.bernoulli(torch.full((4, 64), 0.5))
    torch.testing.assert_close(other.reconstruct(x), vae.reconstruct(x))
    assert meta == {"epoch": 3, "config": {"seed": 1}}
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary files left behind


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    marker = str(tmp_path / "code-ran")
    path = str(tmp_path / "evil.pt")
    torch.save({"format": "pyro-vae-checkpoint/1", "state_dict": {}, "meta": "{}",
                "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(ValueError, match="refusing to load .*evil.pt: it holds pickled Python objects"):
        load_checkpoint(path)
    assert not os.path.exists(marker)


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tiny_vae, tmp_path, monkeypatch):
    vae = tiny_vae()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, vae.state_dict(), epoch=1)
    before = open(path, "rb").read()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {k: v + 1 for k, v in vae.state_dict().items()}, epoch=2)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "none.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pyro-vae checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_the_refusal_does_not_pass_on_torchs_advice_to_load_unsafely(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"payload": _RunsCodeWhenUnpickled(str(tmp_path / "code-ran"))}, path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "weights_only" not in message and "\n" not in message
    assert re.search(r"GLOBAL (builtins|io)\.open", message) and message.endswith("only load files written by pyro-vae")


@pytest.mark.parametrize("cut", [0, 10, 0.5, -1])
def test_a_truncated_or_empty_checkpoint_is_one_line(tiny_vae, tmp_path, cut):
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, tiny_vae().state_dict(), epoch=1)
    data = open(path, "rb").read()
    n = int(len(data) * cut) if isinstance(cut, float) else cut % len(data) if cut < 0 else cut
    open(path, "wb").write(data[:n])
    with pytest.raises(ValueError, match=rf"^{path} is damaged \({n} bytes, .*\): it was truncated or overwritten; "):
        load_checkpoint(path)
