"""Checkpoint loading runs no code from the checkpoint: planted `.metadata` and data files, through every entry point.

A planted checkpoint carries a matching digest manifest (its writer writes that too), so only the
restricted unpickler (metadata) and weights-only reads (values) stand between it and the loading
process. Each test checks the named error and that the payload's marker file does not exist.
Also: resume falls back to the newest checkpoint that verifies, and `model_version` is a digest of
the weights (equal runs, equal versions).
"""

from __future__ import annotations

import builtins
import hashlib
import inspect
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from lumrec.checkpoint import (META_FILE, CheckpointError, CheckpointManager, UnsafeCheckpointError, load_model_weights,
                               read_metadata)
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.modules.warm_start import WarmStartConfig, load_source_state, warm_start_from
from lumrec.pipelines.pretrain import Pretrainer
from lumrec.pipelines.pretrain_config import DataConfig, PretrainConfig, TrainConfig
from lumrec.pipelines.pretrained_lum import load_pretrained_lum
from lumrec.pipelines.query import ConditionSpec, QueryConfig, run_query

DAY = "2026-01-02"


class _System:
    """Unpickles as os.system(command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Exec:
    """Unpickles as builtins.exec(code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


class _Touch:
    """Unpickles as pathlib.Path.touch(PosixPath(marker)): an allowed class's module, a method that is not allowed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


PAYLOADS = {"os.system": _System, "exec": _Exec, "Path.touch": _Touch}
# torch.save pickles with protocol 2, which reaches a method through getattr; torch names builtins without module.
REFUSED = {"os.system": r"posix\.system", "exec": r"(builtins\.)?exec", "Path.touch": r"(pathlib\.Path\.touch|(builtins\.)?getattr)"}


def _rewrite_digests(step_dir: Path) -> None:
    """Recompute the manifest's SHA-256s, as whoever planted the files would."""
    meta = json.loads((step_dir / META_FILE).read_text())
    meta["digests"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(step_dir.iterdir())
                       if p.is_file() and p.name != META_FILE}
    (step_dir / META_FILE).write_text(json.dumps(meta))


def plant_metadata(step_dir: Path, payload: object) -> None:
    """Put `payload` inside the checkpoint's real DCP metadata (storage_meta.modules), with a matching manifest."""
    with open(step_dir / ".metadata", "rb") as fh:
        metadata = pickle.load(fh)  # our own file, written by the test a moment ago
    metadata.storage_meta.modules = [payload]
    with open(step_dir / ".metadata", "wb") as fh:
        pickle.dump(metadata, fh)
    _rewrite_digests(step_dir)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "the planted payload ran"


# -- the metadata ---------------------------------------------------------------------------------


def test_real_metadata_reads_and_the_reader_knows_its_classes(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    step_dir = CheckpointManager(tmp_path).save(1, {"model": model.state_dict(), "optim": opt.state_dict(), "n": 3, "s": "x"})
    metadata = read_metadata(step_dir)
    assert metadata.state_dict_metadata["model.0.weight"].size == torch.Size([8, 4])
    fresh = _model()
    torch.nn.init.zeros_(fresh[0].weight)
    load_model_weights(step_dir, fresh)
    assert torch.equal(fresh[0].weight, model[0].weight)


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_planted_metadata_is_refused_by_the_plain_loaders(tmp_path, marker, kind):
    src = _model()
    root = tmp_path / "ckpt"
    step_dir = CheckpointManager(root).save(3, {"model": src.state_dict()})
    plant_metadata(step_dir, PAYLOADS[kind](marker))
    message = rf"{step_dir}/\.metadata: checkpoint metadata refers to {REFUSED[kind]}, which a checkpoint never holds; refusing"
    with pytest.raises(UnsafeCheckpointError, match=message):
        CheckpointManager(root).load({"model": _model().state_dict()})
    with pytest.raises(UnsafeCheckpointError, match=message):
        CheckpointManager(root).load({"model": _model().state_dict()}, step=3)
    with pytest.raises(UnsafeCheckpointError, match=message):
        load_model_weights(step_dir, _model())
    for source in (root, step_dir):  # warm start and table_init read sources through load_source_state
        with pytest.raises(UnsafeCheckpointError, match=message):
            load_source_state(source)
    with pytest.raises(UnsafeCheckpointError, match=message):
        warm_start_from(_model(), WarmStartConfig(source=str(root)))


def test_planted_metadata_is_never_skipped_for_an_older_checkpoint(tmp_path, marker):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": _model().state_dict()})
    plant_metadata(mgr.save(2, {"model": _model().state_dict()}), _System(marker))
    with pytest.raises(UnsafeCheckpointError, match="step-00000002"):
        mgr.load({"model": _model().state_dict()})


# -- the data files -------------------------------------------------------------------------------


def test_dcp_reads_tensors_weights_only():
    """torch's FileSystemReader reads tensors with torch.load(weights_only=True); values go through the load planner."""
    source = inspect.getsource(FileSystemReader.read_data)
    assert "weights_only=True" in source and "planner.load_bytes" in source


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_planted_value_in_a_data_file_is_refused(tmp_path, marker, kind):
    """A value DCP stores as bytes (here in place of a weight, and as an extra entry) is read weights-only."""
    src = _model()
    state = src.state_dict()
    as_weight = CheckpointManager(tmp_path / "weight").save(1, {"model": {**state, "0.weight": PAYLOADS[kind](marker)}})
    as_value = CheckpointManager(tmp_path / "value").save(1, {"model": state, "n": PAYLOADS[kind](marker)})
    message = r"checkpoint value '{}' refers to {}, which a checkpoint never holds; refusing"
    with pytest.raises(UnsafeCheckpointError, match=message.format(r"model\.0\.weight", REFUSED[kind])):
        load_model_weights(as_weight, _model())
    with pytest.raises(UnsafeCheckpointError, match=message.format("n", REFUSED[kind])):
        CheckpointManager(tmp_path / "value").load({"model": _model().state_dict(), "n": 0})
    with pytest.raises(UnsafeCheckpointError, match=str(as_value)):
        CheckpointManager(tmp_path / "value").load({"model": _model().state_dict(), "n": 0}, step=1)


def test_plain_values_still_load(tmp_path):
    CheckpointManager(tmp_path).save(1, {"n": 3, "t": (1, 2.5), "s": "x", "none": None, "d": {"a": [1, 2]}})
    state = {"n": 0, "t": None, "s": "", "none": 1, "d": {"a": None}}
    CheckpointManager(tmp_path).load(state)
    assert state == {"n": 3, "t": (1, 2.5), "s": "x", "none": None, "d": {"a": [1, 2]}}


def test_data_file_outside_the_folder_is_refused(tmp_path):
    step_dir = CheckpointManager(tmp_path / "ckpt").save(1, {"w": torch.ones(2)})
    with open(step_dir / ".metadata", "rb") as fh:
        metadata = pickle.load(fh)
    for storage in metadata.storage_data.values():
        storage.relative_path = "../../elsewhere.distcp"
    with open(step_dir / ".metadata", "wb") as fh:
        pickle.dump(metadata, fh)
    _rewrite_digests(step_dir)
    with pytest.raises(CheckpointError, match=r"names data file '\.\./\.\./elsewhere\.distcp', which is no file of this"):
        CheckpointManager(tmp_path / "ckpt").load({"w": torch.zeros(2)}, step=1)


# -- pipelines: resume, init_from, the query's LUM --------------------------------------------------


@pytest.fixture(scope="module")
def lum_run(tmp_path_factory):
    """A LUM pre-trained 4 steps with checkpoints at steps 2 and 4 (run/), and its config."""
    root = tmp_path_factory.mktemp("safe")
    data = root / "data"
    generate(data, SynthConfig(seed=1, num_users=30, num_items=30, num_categories=4, num_queries=6, num_days=4))

    def config(out: Path, **train) -> PretrainConfig:
        return PretrainConfig(
            model="lum", out=str(out),
            data=DataConfig(path=str(data), end=DAY, max_len=16, condition_features=["scenario"], item_features=["item_id"]),
            train=TrainConfig(**{"epochs": 1, "rows_per_batch": 4, "num_negatives": 8, "checkpoint_every_steps": 2,
                                 "log_every_steps": 100, **train}),
            model_config={"d_model": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 32},
        )

    Pretrainer(config(root / "a" / "run")).run(max_steps=4)
    return root, data, config


def _copy_run(lum_run, tmp_path) -> Path:
    root = lum_run[0]
    run = tmp_path / "run"
    shutil.copytree(root / "a" / "run", run)
    return run


def test_planted_checkpoint_is_refused_by_resume_init_from_and_query(lum_run, tmp_path, marker):
    _, data, config = lum_run
    run = _copy_run(lum_run, tmp_path)
    step_dir = run / "checkpoints" / "step-00000004"
    plant_metadata(step_dir, _System(marker))
    message = rf"{step_dir}/\.metadata: checkpoint metadata refers to posix\.system"
    with pytest.raises(UnsafeCheckpointError, match=message):  # resume
        Pretrainer(config(run)).run(max_steps=6)
    for source in (run / "checkpoints", step_dir):  # train.init_from, a root folder or a step
        with pytest.raises(UnsafeCheckpointError, match=message):
            Pretrainer(config(tmp_path / f"init-{source.name}", init_from=str(source))).run(max_steps=1)
    with pytest.raises(UnsafeCheckpointError, match=message):  # the query's LUM
        load_pretrained_lum(run, kind="latest")
    with pytest.raises(UnsafeCheckpointError, match=message):
        run_query(QueryConfig(checkpoint=str(run), checkpoint_kind="latest", data=str(data), as_of_ds=DAY,
                              store=str(tmp_path / "store"), conditions=[ConditionSpec("scenario", [1])], progress=False))


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(lum_run, tmp_path, caplog):
    root, _, config = lum_run
    straight = Pretrainer(config(tmp_path / "straight" / "run"))
    straight.run(max_steps=6)
    run = _copy_run(lum_run, tmp_path)
    victim = next((run / "checkpoints" / "step-00000004").glob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:-4] + b"XXXX")
    resumed = Pretrainer(config(run))
    with caplog.at_level(logging.WARNING, logger="lumrec"):
        resumed.run(max_steps=6)
    assert resumed.resumed_from_step == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-00000004: skipped" in w and "SHA-256 mismatch" in w for w in warnings), warnings
    assert (run / "checkpoints" / "step-00000004.damaged").is_dir()  # set aside: pruning never counts it
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_resume_with_no_checkpoint_that_verifies_is_one_named_error(lum_run, tmp_path):
    _, _, config = lum_run
    run = _copy_run(lum_run, tmp_path)
    (run / "checkpoints" / "step-00000004" / META_FILE).unlink()
    (run / "checkpoints" / "step-00000002" / META_FILE).write_text("{ not json")
    with pytest.raises(CheckpointError) as err:
        Pretrainer(config(run)).run(max_steps=6)
    text = str(err.value)
    assert f"{run / 'checkpoints'}: no checkpoint verifies" in text and "move" in text and "aside to start afresh" in text
    assert "step-00000004: " in text and f"partial checkpoint, {META_FILE} missing" in text
    assert "step-00000002: " in text and "corrupt checkpoint metadata" in text
    assert (run / "checkpoints" / "step-00000004").is_dir(), "a failed resume moves nothing"


def test_init_from_a_damaged_step_names_that_step(lum_run, tmp_path):
    _, _, config = lum_run
    run = _copy_run(lum_run, tmp_path)
    step_dir = run / "checkpoints" / "step-00000004"
    victim = next(step_dir.glob("*.distcp"))
    victim.write_bytes(b"X" + victim.read_bytes()[1:])
    with pytest.raises(CheckpointError, match=rf"{victim}: corrupt checkpoint file"):
        Pretrainer(config(tmp_path / "init", init_from=str(step_dir))).run(max_steps=1)
    init = Pretrainer(config(tmp_path / "init-root", init_from=str(run / "checkpoints")))  # the root: falls back to step 2
    init.run(max_steps=1)


def test_model_version_is_a_digest_of_the_weights(lum_run, tmp_path):
    root, _, config = lum_run
    Pretrainer(config(tmp_path / "b" / "run")).run(max_steps=4)  # the same run again, in another folder
    first, again = load_pretrained_lum(root / "a" / "run", "latest"), load_pretrained_lum(tmp_path / "b" / "run", "latest")
    assert first.model_version == again.model_version
    assert first.model_version.startswith("run/checkpoints/step-00000004@") and len(first.model_version.split("@")[1]) == 12
    assert (root / "a" / "run" / "checkpoints" / "step-00000004" / ".metadata").read_bytes() != \
        (tmp_path / "b" / "run" / "checkpoints" / "step-00000004" / ".metadata").read_bytes()  # why files cannot be the digest
    other = load_pretrained_lum(root / "a" / "run" / "checkpoints" / "step-00000002")
    assert other.model_version.split("@")[1] != first.model_version.split("@")[1]


def test_a_step_folder_given_to_the_query_is_verified_once_and_a_damaged_one_refused(lum_run, tmp_path):
    root, _, config = lum_run
    Pretrainer(config(tmp_path / "c" / "run")).run(max_steps=4)
    step_dir = tmp_path / "c" / "run" / "checkpoints" / "step-00000004"
    victim = next(step_dir.glob("*.distcp"))
    victim.write_bytes(b"X" + victim.read_bytes()[1:])
    with pytest.raises(CheckpointError, match=rf"{victim}: corrupt checkpoint file"):
        load_pretrained_lum(step_dir)
