"""Checkpoints: round trip, latest/keep, partial and corrupt checkpoints named in errors, fallback to a valid one, digests."""

from __future__ import annotations

import logging

import pytest
import torch

from lumrec.checkpoint import CheckpointError, CheckpointManager, load_model_weights, tensor_digest
from lumrec.locks import LOCK_FILE, RunLock


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
    # A save never touches another writer's temporary folder; the lock's startup cleanup removes a killed one.
    (tmp_path / ".tmp-step-00000009-deadbeef").mkdir(parents=True)
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": _model(0).state_dict()})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-step-00000009-deadbeef", "step-00000001"]
    with RunLock(tmp_path, "test"):
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "step-00000001"]


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


def _damage(step_dir):
    victim = next(step_dir.glob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:-4] + b"XXXX")
    return victim


def test_latest_load_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep=5)
    models = {step: _model(step) for step in (1, 2, 3, 4)}
    dirs = {step: mgr.save(step, {"model": m.state_dict()}) for step, m in models.items()}
    victim = _damage(dirs[4])
    (dirs[3] / "lumrec_meta.json").unlink()
    (dirs[2] / "lumrec_meta.json").write_text("[1, 2")
    state = {"model": _model(9).state_dict()}
    with caplog.at_level(logging.WARNING, logger="lumrec.checkpoint"):
        info = mgr.load(state)
    assert info.step == 1
    assert all(torch.equal(a, b) for a, b in zip(state["model"].values(), models[1].state_dict().values()))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{dirs[4]}: skipped, not a usable checkpoint: {victim}: corrupt checkpoint file (SHA-256 mismatch)" in warned
    assert any(w.startswith(f"{dirs[3]}: skipped") and "partial checkpoint, lumrec_meta.json missing" in w for w in warned)
    assert any(w.startswith(f"{dirs[2]}: skipped") and "corrupt checkpoint metadata" in w for w in warned)
    assert any("using step 1, the newest checkpoint that verifies (3 newer skipped)" in w for w in warned)
    # A named step still fails on that step.
    with pytest.raises(CheckpointError, match=rf"{victim}: corrupt checkpoint file"):
        mgr.load({"model": _model(9).state_dict()}, step=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step-0000000{s}" for s in (1, 2, 3, 4)]  # load moves nothing


def test_a_folder_where_nothing_verifies_is_one_named_error(tmp_path):
    mgr = CheckpointManager(tmp_path)
    first, second = _damage(mgr.save(1, {"model": _model(0).state_dict()})), mgr.save(2, {"model": _model(0).state_dict()})
    (second / ".metadata").unlink()
    with pytest.raises(CheckpointError) as err:
        mgr.load({"model": _model(0).state_dict()})
    text = str(err.value)
    assert text.startswith(f"{tmp_path}: no checkpoint verifies (step-00000002: ")
    assert f"step-00000001: {first}: corrupt checkpoint file (SHA-256 mismatch)" in text
    assert "file .metadata listed in lumrec_meta.json is missing" in text
    assert text.endswith(f"restore a good copy, or move {tmp_path} aside to start afresh")


def test_resume_sets_newer_damaged_checkpoints_aside(tmp_path):
    """keep=1: a damaged newest checkpoint left in place would be the one kept when the resumed run saves."""
    mgr = CheckpointManager(tmp_path, keep=1)
    good = _model(0)
    mgr.save(5, {"model": good.state_dict()})
    mgr.keep = 2
    mgr.save(9, {"model": _model(1).state_dict()})
    _damage(mgr.step_dir(9))
    mgr.keep = 1
    state = {"model": _model(2).state_dict()}
    assert mgr.resume(state).step == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000005", "step-00000009.damaged"]
    mgr.save(7, {"model": good.state_dict()})
    assert mgr.steps() == [7] and mgr.latest() == 7
    mgr.keep = 2
    _damage(mgr.save(9, {"model": good.state_dict()}))  # damaged again: kept beside the first
    assert mgr.resume({"model": _model(2).state_dict()}).step == 7
    assert (tmp_path / "step-00000009.damaged-2").is_dir()


def test_unlisted_or_misplaced_files_do_not_verify(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(3, {"model": _model(0).state_dict()})
    (path / "__9_0.distcp").write_bytes(b"extra")
    with pytest.raises(CheckpointError, match=r"__9_0\.distcp not listed in lumrec_meta\.json"):
        mgr.verify(3)
    (path / "__9_0.distcp").unlink()
    moved = path.rename(tmp_path / "step-00000004")
    with pytest.raises(CheckpointError, match=r"records step 3, not the folder's step 4"):
        mgr.verify(4)
    assert moved.exists()


def test_tensor_digest_is_equal_for_equal_weights_only():
    a, b = _model(0).state_dict(), _model(0).state_dict()
    assert tensor_digest(a) == tensor_digest(b) == tensor_digest(dict(reversed(list(b.items()))))
    b["0.bias"] = b["0.bias"].clone()
    b["0.bias"][0] += 1e-7
    assert tensor_digest(a) != tensor_digest(b)
    assert tensor_digest({"w": torch.zeros(2)}) != tensor_digest({"w": torch.zeros(2, dtype=torch.float64)})
    assert tensor_digest({"w": torch.zeros(4)}) != tensor_digest({"w": torch.zeros(2, 2)})
    assert tensor_digest({"w": torch.ones(3, dtype=torch.bfloat16)}) == tensor_digest({"w": torch.ones(3, dtype=torch.bfloat16)})
