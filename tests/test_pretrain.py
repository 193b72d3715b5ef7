"""Pre-training pipeline: learning, leave-one-out evaluation, and exact resume after an interruption."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from lumrec.config import ConfigError
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.modules.retrieval.sequence_model import ITEM, SequentialRecommender
from lumrec.modules.retrieval.registry import MODEL_BUILDERS, register_model
from lumrec.pipelines.pretrain import DataConfig, PretrainConfig, Pretrainer, TrainConfig


class TinyCausalModel(SequentialRecommender):
    """Item embedding + running mean over each sequence's past (causal) + a linear layer."""

    predicts_from = ITEM

    def __init__(self, num_items: int, dim: int = 8):
        super().__init__()
        self._num_items = num_items
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="item", embedding_dim=dim, num_embeddings=num_items, feature_names=["item_id"])]
        )
        self.mix = torch.nn.Linear(2 * dim, dim)
        self.dropout = torch.nn.Dropout(0.1)

    @property
    def num_items(self) -> int:
        return self._num_items

    def forward(self, batch):
        x = self.dropout(self.ebc(batch.kjt)["item_id"])
        seq = torch.repeat_interleave(torch.arange(batch.num_segments), batch.lengths())
        csum = torch.cumsum(x, 0)
        start = batch.offsets[:-1][seq]
        before = torch.where((start > 0).unsqueeze(1), csum[(start - 1).clamp(min=0)], torch.zeros_like(x))
        mean = (csum - before) / (batch.position + 1).unsqueeze(1)
        return self.mix(torch.cat([x, mean], 1))

    def item_embeddings(self, ids):
        return self.ebc.embedding_bags["item"].weight[ids]


@register_model("tiny-test")
def _build_tiny(model_config, meta, data, token_config, max_len):
    return TinyCausalModel(meta.vocab_sizes["item_id"], **model_config)


@pytest.fixture(scope="module")
def synth_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "data"
    generate(path, SynthConfig(num_users=150, num_items=80, num_categories=5, num_queries=10, num_days=3))
    return str(path)


def _config(synth_path, out, **train) -> PretrainConfig:
    defaults = dict(epochs=2, rows_per_batch=4, num_negatives=16, checkpoint_every_steps=5, log_every_steps=2, patience=5)
    defaults.update(train)
    return PretrainConfig(
        model="tiny-test", out=str(out), data=DataConfig(path=synth_path, max_len=32), train=TrainConfig(**defaults)
    )


def _weights(trainer: Pretrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_uninterrupted_vs_resumed_runs_are_identical(synth_path, tmp_path):
    straight = Pretrainer(_config(synth_path, tmp_path / "a"))
    result_a = straight.run()
    weights_a = _weights(straight)

    first = Pretrainer(_config(synth_path, tmp_path / "b"))
    partial = first.run(max_steps=7)  # "killed" after step 7: checkpoints at 5 and 7
    assert partial["stopped"] == "max_steps"
    resumed = Pretrainer(_config(synth_path, tmp_path / "b"))
    result_b = resumed.run()
    assert resumed.state.step == straight.state.step
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert result_a["test"] == result_b["test"]
    assert [h["hr@10"] for h in result_a["history"]] == [h["hr@10"] for h in result_b["history"]]
    assert (result_a["resumed_from_step"], result_b["resumed_from_step"]) == (None, 7)  # the results say a run was resumed


def test_kill_at_an_epoch_end_resumes_with_that_epochs_evaluation(synth_path, tmp_path):
    """A run stopped by max_steps on an epoch's last step is evaluated before it stops: the resumed run's history is whole."""
    straight = Pretrainer(_config(synth_path, tmp_path / "a"))
    result = straight.run()
    epoch_steps = result["history"][0]["step"]
    first = Pretrainer(_config(synth_path, tmp_path / "b"))
    assert first.run(max_steps=epoch_steps) == {"step": epoch_steps, "stopped": "max_steps"}
    resumed = Pretrainer(_config(synth_path, tmp_path / "b")).run()
    assert resumed["history"] == result["history"] and resumed["test"] == result["test"]


def test_resume_from_mid_epoch_checkpoint_after_partial_save(synth_path, tmp_path):
    first = Pretrainer(_config(synth_path, tmp_path / "c"))
    first.run(max_steps=7)
    # A save killed half-way leaves a temp folder or a meta-less folder: both are ignored.
    (tmp_path / "c" / "checkpoints" / ".tmp-step-00000009-cafe").mkdir()
    again = Pretrainer(_config(synth_path, tmp_path / "c"))
    assert again.maybe_resume() and again.state.step == 7


def test_results_and_learning(synth_path, tmp_path):
    trainer = Pretrainer(_config(synth_path, tmp_path / "d", epochs=3))
    result = trainer.run()
    saved = json.loads((tmp_path / "d" / "results.json").read_text())
    assert saved["test"] == result["test"] and saved["epochs_run"] == 3
    assert set(result["test"]) >= {"hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@200"}
    # the tiny model must beat chance (HR@10 = 10/79) on the synthetic logs' planted interests
    assert result["test"]["hr@50"] > 50 / 79
    assert (tmp_path / "d" / "tb").exists() and any((tmp_path / "d" / "best").iterdir())


def test_job_start_line_and_tensorboard_scalars(synth_path, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lumrec"):
        trainer = Pretrainer(_config(synth_path, tmp_path / "tb", epochs=1))
        trainer.run()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrain: "))
    assert line.startswith(f"pretrain: {trainer.num_train_users:,} users, {trainer.loader.tokens.num_tokens:,} tokens, ")
    assert f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters, device cpu, " in line
    events = EventAccumulator(str(tmp_path / "tb" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "valid/hr@10", "test/hr@10"} <= tags
    # Logged every second step (log_every_steps=2); the gradient norm is read before the optimizer step.
    assert [e.step for e in events.Scalars("train/grad_norm")] == list(range(2, trainer.state.step + 1, 2))
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))


def test_config_errors_name_the_key(synth_path, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: tiny-test\ntrain:\n  epochz: 3\n")
    from lumrec.config import load_config

    with pytest.raises(ConfigError, match="unknown config key 'train.epochz'"):
        load_config(PretrainConfig, path)
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        Pretrainer(PretrainConfig(model="nope", data=DataConfig(path=synth_path)))
    assert "tiny-test" in MODEL_BUILDERS


@pytest.mark.parametrize("seed", range(4))
def test_seen_item_mask_matches_reference(seed):
    """Each segment masks the items of its tokens before the last one (its target); id 0 never."""
    from lumrec.pipelines.retrieval_eval import seen_item_mask

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (5,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    item_id = torch.randint(0, 9, (int(lengths.sum()),), generator=g)
    mask = seen_item_mask(item_id, offsets, 9)
    for s in range(5):
        history = item_id[offsets[s] : max(offsets[s + 1] - 1, offsets[s])].tolist()
        expected = [i != 0 and i in history for i in range(9)]
        assert mask[s].tolist() == expected


def test_train_excludes_last_one_trains_on_validation_targets(synth_path, tmp_path):
    """Published protocol: training sees the validation event, no validation runs, the final model is tested."""
    strict = Pretrainer(_config(synth_path, tmp_path / "s", epochs=1))
    published_cfg = _config(synth_path, tmp_path / "p", epochs=1)
    published_cfg.data.train_excludes_last = 1
    published = Pretrainer(published_cfg)
    assert published.loader.tokens.num_tokens == strict.loader.tokens.num_tokens + len(strict.split.valid.user_ids)
    result = published.run()
    assert result["best_epoch"] == -1 and result["epochs_run"] == 1 and not any((tmp_path / "p" / "best").glob("*"))
    assert 0.0 <= result["test"]["hr@10"] <= 1.0
    bad = _config(synth_path, tmp_path / "b")
    bad.data.train_excludes_last = 3
    with pytest.raises(ValueError, match="train_excludes_last"):
        Pretrainer(bad)


def test_exclude_seen_never_ranks_history_items(synth_path, tmp_path):
    """With exclude_seen, a history item scores below every candidate; the target's rank can only improve."""
    from lumrec.pipelines.retrieval_eval import evaluate_retrieval

    trainer = Pretrainer(_config(synth_path, tmp_path / "e", epochs=1))
    args = (trainer.model, trainer.split.test, trainer.token_config, 32)
    plain = evaluate_retrieval(*args, exclude_seen=False)
    filtered = evaluate_retrieval(*args, exclude_seen=True)
    assert filtered["mrr"] >= plain["mrr"] and filtered["hr@10"] >= plain["hr@10"]


def test_lr_decay_schedule_shape(synth_path, tmp_path):
    trainer = Pretrainer(_config(synth_path, tmp_path / "s", lr_decay_fraction=0.25, lr_final_ratio=0.1))
    assert trainer.lr_multiplier(0.0) == 1.0 and trainer.lr_multiplier(0.75) == 1.0
    assert abs(trainer.lr_multiplier(0.875) - 0.55) < 1e-12
    assert abs(trainer.lr_multiplier(1.0) - 0.1) < 1e-12
    assert trainer.lr_multiplier(2.0) == trainer.lr_multiplier(1.0)
    constant = Pretrainer(_config(synth_path, tmp_path / "t"))
    assert constant.lr_multiplier(0.99) == 1.0


def test_step_budget_ends_with_a_tested_model_and_equals_a_run_cut_by_time_at_that_step(synth_path, tmp_path):
    """train.max_steps ends a run as the time budget does (evaluated, best kept, tested), at the same step on any machine."""
    epochs = _config(synth_path, tmp_path / "x").train.epochs
    full = Pretrainer(_config(synth_path, tmp_path / "full")).run()
    steps = full["steps"] // epochs + 3  # inside the second epoch
    budget = Pretrainer(_config(synth_path, tmp_path / "steps", max_steps=steps))
    result = budget.run()
    assert result["steps"] == steps and set(result["test"]) >= {"hr@10", "ndcg@10"}
    assert [h["step"] for h in result["history"]] == [full["history"][0]["step"], steps]  # the cut epoch is evaluated
    # The same cut made by the time budget: a clock that runs out exactly at that step.
    timed = Pretrainer(_config(synth_path, tmp_path / "timed", max_minutes=1.0))
    timed.loop._local_seconds = lambda: 61.0 if timed.state.step >= steps else 0.0
    assert {k: v for k, v in timed.run().items() if k not in ("train_minutes", "tokens_per_s", "mfu")} == \
        {k: v for k, v in result.items() if k not in ("train_minutes", "tokens_per_s", "mfu")}
    # The lr schedule's length is the step budget when it is the shorter one.
    decayed = Pretrainer(_config(synth_path, tmp_path / "decay", max_steps=steps, lr_decay_fraction=0.5))
    decayed.run()
    assert decayed._total_steps == steps


def test_lr_decay_run_resumes_identically(synth_path, tmp_path):
    """The decayed lr is a function of saved progress, so a resumed run replays it exactly."""
    cfg = dict(lr_decay_fraction=0.5)
    straight = Pretrainer(_config(synth_path, tmp_path / "a", **cfg))
    straight.run()
    lrs = [g["lr"] for opt in straight.optimizers for g in opt.param_groups]
    assert all(lr < 1e-3 * 0.2 for lr in lrs)  # near the end of the decay
    first = Pretrainer(_config(synth_path, tmp_path / "b", **cfg))
    first.run(max_steps=7)
    resumed = Pretrainer(_config(synth_path, tmp_path / "b", **cfg))
    resumed.run()
    for name, tensor in _weights(straight).items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_target_start_trains_only_on_new_days_targets(synth_path, tmp_path):
    """Continued training: events before target_start are context, never targets; inactive users are skipped."""
    from lumrec.data.dataset import Dataset, day_bounds
    from lumrec.data.sequences import sequences_from_dataset
    from lumrec.modules.retrieval.sequence_model import next_item_queries

    last_day = Dataset(synth_path).days("behaviours")[-1]
    cfg = _config(synth_path, tmp_path / "ts", epochs=1)
    cfg.data.train_excludes_last, cfg.data.target_start = 0, last_day
    trainer = Pretrainer(cfg)
    start = day_bounds(last_day)[0]
    seqs = sequences_from_dataset(Dataset(synth_path))
    assert trainer.num_train_users == int((seqs.last_event_ts() >= start).sum()) < len(seqs)
    seen = []
    real = trainer.trainer.loss.forward

    def spy(hidden, targets, *args, **kwargs):
        seen.append(len(targets))
        return real(hidden, targets, *args, **kwargs)

    trainer.trainer.loss.forward = spy
    for batch in trainer.loader:
        index, _ = next_item_queries(batch, trainer.model.predicts_from)
        new = int((batch.ts[index + 1] >= start).sum())
        before = len(seen)
        trainer.train_step(batch)
        assert (seen[before:] or [0])[0] == new  # exactly the targets on or after target_start
    assert sum(seen) > 0


def test_table_init_copies_an_existing_models_tables(synth_path, tmp_path):
    """Feature warm-up: a fresh run starts with the tables of another model's checkpoint (names mapped)."""
    cfg = _config(synth_path, tmp_path / "src")
    source = Pretrainer(cfg).model
    with torch.no_grad():
        source.ebc.embedding_bags["item"].weight.normal_()
    # Only table tensors (".embedding_bags." / ".embeddings." in the name) travel; the MLP is ignored.
    # The item table here sits in an EmbeddingCollection, as DIN/SIM keep their behaviour tables.
    torch.save({"dlrm.x.embeddings.item.weight": source.ebc.embedding_bags["item"].weight.detach().clone(),
                "dlrm.mlp.weight": torch.ones(3, 3)}, tmp_path / "dlrm.pt")
    from lumrec.modules.warm_start_config import WarmStartConfig

    target_cfg = _config(synth_path, tmp_path / "dst")
    target_cfg.train.table_init = WarmStartConfig(source=str(tmp_path / "dlrm.pt"), name_map={r"^dlrm\.x\.embeddings\.": "ebc.embedding_bags."})
    target = Pretrainer(target_cfg)
    target.maybe_resume()
    assert torch.equal(target.model.ebc.embedding_bags["item"].weight, source.ebc.embedding_bags["item"].weight)
    assert target.table_init_report["tables"] == ["ebc.embedding_bags.item.weight"]
    target_cfg.train.epochs = 1
    result = Pretrainer(target_cfg).run()  # the report is kept beside the checkpoints and reaches results.json
    assert result["table_init"] == {"source": str(tmp_path / "dlrm.pt"), "tables": ["ebc.embedding_bags.item.weight"]}
    bad_cfg = _config(synth_path, tmp_path / "bad")
    bad_cfg.train.table_init = WarmStartConfig(source=str(tmp_path / "dlrm.pt"))
    with pytest.raises(ValueError, match="no embedding table of .*dlrm.pt matched"):
        Pretrainer(bad_cfg).maybe_resume()


def test_condition_dropout_is_for_lum_only(synth_path, tmp_path):
    cfg = _config(synth_path, tmp_path / "run")
    cfg.data.condition_dropout = 0.2
    with pytest.raises(ValueError, match="condition_dropout applies to LUM only"):
        Pretrainer(cfg)


def test_embedding_optimizer_adamw_is_per_element_and_resumes_identically(synth_path, tmp_path):
    straight = Pretrainer(_config(synth_path, tmp_path / "ea", embedding_optimizer="adamw"))
    assert type(straight.optimizers[-1]) is torch.optim.AdamW  # the tables' optimizer, not RowwiseAdamW
    table = straight.model.ebc.embedding_bags["item"].weight
    assert any(p is table for p in straight.optimizers[-1].param_groups[0]["params"])
    straight.run()
    # per-element second moment: the state has the table's shape (RowwiseAdamW keeps one per row)
    assert straight.optimizers[-1].state[table]["exp_avg_sq"].shape == table.shape
    weights = _weights(straight)

    first = Pretrainer(_config(synth_path, tmp_path / "eb", embedding_optimizer="adamw"))
    first.run(max_steps=7)
    resumed = Pretrainer(_config(synth_path, tmp_path / "eb", embedding_optimizer="adamw"))
    resumed.run()
    for name, tensor in weights.items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name

    rowwise = Pretrainer(_config(synth_path, tmp_path / "ec"))
    rowwise.run()
    assert not torch.equal(weights["ebc.embedding_bags.item.weight"], rowwise.model.state_dict()["ebc.embedding_bags.item.weight"])


def test_unknown_embedding_optimizer_names_the_key(synth_path, tmp_path):
    with pytest.raises(ValueError, match="train.embedding_optimizer must be one of"):
        Pretrainer(_config(synth_path, tmp_path / "ed", embedding_optimizer="sgd"))


def test_resume_refuses_another_config_and_accepts_budget_changes(synth_path, tmp_path):
    Pretrainer(_config(synth_path, tmp_path / "r")).run(max_steps=7)
    # Another learning rate on the same run folder would mix two experiments: refused, naming the key and both values.
    with pytest.raises(ConfigError, match=r"holds checkpoints of a run with another config \(train\.lr: 0\.001 -> 0\.002\)"):
        Pretrainer(_config(synth_path, tmp_path / "r", lr=2e-3)).run()
    changed_model = _config(synth_path, tmp_path / "r")
    changed_model.model_config = {"dim": 4}
    with pytest.raises(ConfigError, match=r"model_config\.dim: '\(absent\)' -> 4"):
        Pretrainer(changed_model).run()
    # A run folder written before a config key existed resumes: the missing key counts as its default.
    config_file = tmp_path / "r" / "config.json"
    saved = json.loads(config_file.read_text())
    del saved["train"]["embedding_optimizer"]
    config_file.write_text(json.dumps(saved))
    # A longer budget and another logging interval are resumable changes; the run goes on from step 7.
    resumed = Pretrainer(_config(synth_path, tmp_path / "r", epochs=3, log_every_steps=3))
    result = resumed.run()
    assert result["resumed_from_step"] == 7 and resumed.loader.epoch == 3
    assert json.loads(config_file.read_text())["train"]["epochs"] == 3  # the config of the resumed run is saved
    config_file.write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        Pretrainer(_config(synth_path, tmp_path / "r", epochs=3)).run()


def test_long_history_windows_train_on_every_event_and_resume_identically(synth_path, tmp_path):
    """`data.long_history: windows` cuts long histories into max_len windows: every training event
    but each user's first is a target exactly once, and a resumed run matches an uninterrupted one."""

    def config(out, **train):
        cfg = _config(synth_path, out, epochs=1, **train)
        cfg.data.max_len, cfg.data.long_history = 8, "windows"
        return cfg

    last_cfg = _config(synth_path, tmp_path / "last", epochs=1)
    last_cfg.data.max_len = 8
    last = Pretrainer(last_cfg)
    straight = Pretrainer(config(tmp_path / "w"))
    train_events = straight.split.train.lengths()
    assert train_events.max() > 8  # the synthetic logs do have histories longer than a window
    windows = straight.loader.tokens
    targets_per_window = np.maximum(windows.lengths() - 1, 0)
    assert targets_per_window.sum() == np.maximum(train_events - 1, 0).sum()
    assert windows.lengths().max() <= 8 and len(windows) > len(last.loader.tokens)
    result = straight.run()
    assert 0.0 <= result["test"]["hr@10"] <= 1.0
    first = Pretrainer(config(tmp_path / "r"))
    first.run(max_steps=5)
    resumed = Pretrainer(config(tmp_path / "r"))
    assert resumed.run()["test"] == result["test"]
    bad = config(tmp_path / "bad")
    bad.data.long_history = "all"
    with pytest.raises(ValueError, match="data.long_history must be one of"):
        Pretrainer(bad)
    bad.data.long_history, bad.data.target_start = "windows", "2024-01-02"
    with pytest.raises(ValueError, match="long_history=windows cannot be combined with data.target_start"):
        Pretrainer(bad)


@pytest.mark.parametrize("num_negatives", [-1, 16])
def test_loss_excluding_seen_items_trains(synth_path, tmp_path, num_negatives):
    """train.loss_excludes_seen: a run trains and learns, with the full softmax and with in-batch + sampled negatives."""
    result = Pretrainer(_config(synth_path, tmp_path / "s", epochs=3, num_negatives=num_negatives, loss_excludes_seen=True)).run()
    assert result["test"]["hr@50"] > 50 / 79  # beats chance, as the default loss does (test_results_and_learning)
