"""Checkpoints: round trip, latest/keep, partial and corrupt checkpoints named in errors."""

from __future__ import annotations

import pytest
import torch

from lumrec.checkpoint import CheckpointError, CheckpointManager, load_model_weights


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


def _train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_round_trip_resumes_same_trajectory(tmp_path):
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for s in range(3):
        _train_step(model, opt, s)
    mgr = CheckpointManager(tmp_path / "ckpt")
    mgr.save(3, {"model": model.state_dict(), "optim": opt.state_dict()}, extra={"batch_index": 3})
    uninterrupted = [_train_step(model, opt, s) for s in range(3, 6)]

    model2 = _model(1)  # different init: everything must come from the checkpoint
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    _train_step(model2, opt2, 99)  # materialise optimizer state so DCP can load into it
    state = {"model": model2.state_dict(), "optim": opt2.state_dict()}
    info = mgr.load(state)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optim"])
    assert info.step == 3 and info.extra == {"batch_index": 3}
    resumed = [_train_step(model2, opt2, s) for s in range(3, 6)]
    assert resumed == uninterrupted


def test_latest_and_keep(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    model = _model(0)
    for step in (1, 2, 3):
        mgr.save(step, {"model": model.state_dict()})
    assert mgr.steps() == [2, 3] and mgr.latest() == 3


def test_partial_checkpoint_is_ignored_and_named(tmp_path):
    mgr = CheckpointManager(tmp_path)
    model = _model(0)
    mgr.save(1, {"model": model.state_dict()})
    path = mgr.save(2, {"model": model.state_dict()})
    (path / "lumrec_meta.json").unlink()  # as if killed before the meta was written
    assert mgr.latest() == 1
    with pytest.raises(CheckpointError, match=r"step-00000002: partial checkpoint"):
        mgr.verify(2)


def test_corrupt_file_is_named(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(5, {"model": _model(0).state_dict()})
    victim = next(p for p in path.iterdir() if p.suffix == ".distcp")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{victim.name}: corrupt checkpoint file"):
        mgr.load({"model": _model(0).state_dict()})
    (path / "lumrec_meta.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="corrupt checkpoint metadata"):
        mgr.verify(5)


def test_leftover_temp_folders_are_cleaned(tmp_path):
    (tmp_path / ".tmp-step-00000009-deadbeef").mkdir(parents=True)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": _model(0).state_dict()})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_load_model_weights_and_missing(tmp_path):
    src = _model(0)
    path = CheckpointManager(tmp_path).save(7, {"model": src.state_dict()})
    dst = _model(1)
    load_model_weights(path, dst)
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        CheckpointManager(tmp_path / "empty").load({})
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_model_weights(tmp_path, dst)
