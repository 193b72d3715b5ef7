"""HSTU ranker: jagged forward vs a per-sample dense reference, causality, `lumrec rank model=hstu`, warm start."""

from __future__ import annotations

import dataclasses
import doctest
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import lumrec.modules.ranking.hstu_ranking as hstu_ranking_mod
from lumrec.modules.ops import build_attention_layout
from lumrec.modules.layers.hstu import HSTUConfig, HSTULayer
from lumrec.modules.ranking.hstu_ranking import HSTURanker, HSTURankerConfig, append_candidates
from lumrec.modules.ranking.builder import RankModelConfig, build_ranker
from lumrec.modules.ranking.base import RankingBatch, RankingTrain, TableConfig, with_timestamps
from lumrec.modules.warm_start import warm_start
from lumrec.pipelines.rank import run_rank
from test_rank_pipeline import lum_config, make_data, rank_config, write_store  # noqa: E402 - shared tiny data

USERS, ITEMS, CATS, D, DENSE, LUM, MAX_HIST = 7, 30, 5, 4, 3, 5, 40
KEYS = ["user_id", "item_id", "category_id", "hist_item_id", "hist_category_id"]


def config(lum_dim: int = 0, **kw) -> HSTURankerConfig:
    """The test ranker; keys of `HSTUConfig` in `kw` go to its layers (`hstu`), the others to the ranker."""
    layer_keys = {f.name for f in dataclasses.fields(HSTUConfig)}
    layer = dict(num_heads=2, max_len=6, num_time_buckets=32)
    layer.update({k: kw.pop(k) for k in list(kw) if k in layer_keys})
    base = dict(
        sequence_tables=[TableConfig("t_item", ITEMS, D, ["item_id", "hist_item_id"]),
                         TableConfig("t_cat", CATS, D, ["category_id", "hist_category_id"])],
        candidate_keys=["item_id", "category_id"], history_keys=["hist_item_id", "hist_category_id"],
        context_tables=[TableConfig("t_user", USERS, D, ["user_id"])], dense_dim=DENSE, lum_dim=lum_dim,
        mlp=[8], num_layers=2, hstu=layer,
    )
    base.update(kw)
    return HSTURankerConfig(**base)


def batch(n: int, seed: int, lum_dim: int = 0, timestamps: bool = True) -> RankingBatch:
    """Random samples, history lengths 0, 1 and MAX_HIST included, increasing times, dense and optional LUM features."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, MAX_HIST + 1, (n,), generator=g)
    lengths[:3] = torch.tensor([0, 1, MAX_HIST])
    total = int(lengths.sum())
    hist_items = torch.randint(0, ITEMS, (total,), generator=g)
    one = torch.ones(n, dtype=torch.int64)
    values = torch.cat([torch.randint(0, USERS, (n,), generator=g), torch.randint(0, ITEMS, (n,), generator=g),
                        torch.randint(0, CATS, (n,), generator=g), hist_items, hist_items % CATS])
    kjt = KeyedJaggedTensor.from_lengths_sync(KEYS, values, torch.cat([one, one, one, lengths, lengths]).to(torch.int32))
    # Times: each history ascending with gaps from seconds to days; the sample comes after its history.
    gaps = torch.randint(1, 200_000, (total + n,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    hist_ts = torch.cat([1_700_000_000 + torch.cumsum(gaps[offsets[b]:offsets[b + 1]], 0) for b in range(n)])
    last = torch.tensor([int(hist_ts[offsets[b + 1] - 1]) if lengths[b] else 1_700_000_000 for b in range(n)])
    if timestamps:
        kjt = with_timestamps(kjt, last + gaps[total:], hist_ts, lengths)
    lum = torch.randn(n, lum_dim, generator=g) if lum_dim else None
    return RankingBatch(kjt, torch.randint(0, 2, (n,), generator=g).float(), torch.rand(n, DENSE, generator=g), lum)


# -- the plain reference: one sample at a time, dense causal HSTU ------------------------------------------------
def reference_layer(layer: HSTULayer, x: torch.Tensor, ts: torch.Tensor | None) -> torch.Tensor:
    """One HSTU layer on one sequence x [L, d] with a full L x L causal mask."""
    cfg, length = layer.config, x.shape[0]
    heads = cfg.num_heads
    u, v, q, k = torch.split(F.silu(layer.f1(layer.input_norm(x))), [heads * cfg.dv] * 2 + [heads * cfg.dqk] * 2, dim=-1)
    q, k, v = (t.reshape(length, heads, -1).transpose(0, 1) for t in (q, k, v))  # [H, L, .]
    scores = q @ k.transpose(-1, -2)
    if layer.relative_bias is not None:
        positions = torch.arange(length)[None]
        scores = scores + layer.relative_bias(positions, None if ts is None else ts[None])[0]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
    attn = (F.silu(scores) * causal / cfg.resolved_normaliser) @ v  # [H, L, dv]
    attn = attn.transpose(0, 1).reshape(length, heads * cfg.dv)
    return x + layer.f2(layer.dropout(layer.attn_norm(attn) * u))


def reference_forward(model: HSTURanker, b: RankingBatch) -> torch.Tensor:
    """The model's logits computed per sample: [history, candidate] through dense causal layers."""
    sparse = b.sparse_features
    candidate, history, offsets = model.sequence_arch(sparse)
    times = sparse.to_dict()
    sample_ts, hist_ts = times["sample_ts"].values(), times["hist_ts"].values()
    states = []
    for i in range(sparse.stride()):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        x = model.input_proj(torch.cat([history[lo:hi], candidate[i : i + 1]]))
        ts = torch.cat([hist_ts[lo:hi], sample_ts[i : i + 1]]) if model.config.hstu.use_time_bias else None
        for layer in model.stack.layers:
            x = reference_layer(layer, x, ts)
        states.append(x[-1])
    parts = [model.context_arch(sparse), model.output_norm(torch.stack(states)), b.dense_features]
    if b.lum_features is not None:
        parts.append(b.lum_features)
    return model.over_arch(torch.cat(parts, dim=1))


@pytest.mark.parametrize("bias", [dict(), dict(use_time_bias=False), dict(use_position_bias=False, use_time_bias=False)],
                         ids=["pos+time", "pos", "none"])
def test_jagged_forward_and_grads_equal_the_per_sample_reference(bias: dict) -> None:
    torch.manual_seed(0)
    model = HSTURanker(config(LUM, **bias))
    b = batch(12, seed=1, lum_dim=LUM)
    # Skewed lengths: the jagged path cuts the batch into several length buckets (no B x Lmax x Lmax padding).
    assert len(build_attention_layout(model.encode(b.sparse_features)[1]).buckets) >= 2
    train = RankingTrain(model)
    loss, logits = train(b)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = reference_forward(model, b)
    torch.nn.BCEWithLogitsLoss()(ref, b.labels).backward()
    torch.testing.assert_close(logits, ref.detach(), rtol=1e-5, atol=1e-5)
    assert sorted(grads) == sorted(n for n, p in model.named_parameters() if p.grad is not None)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    bias_grads = [g for n, g in grads.items() if "relative_bias" in n]
    assert len(bias_grads) == {"pos+time": 4, "pos": 2, "none": 0}[_bias_id(bias)]
    assert all(float(g.abs().sum()) > 0 for g in bias_grads)


def _bias_id(bias: dict) -> str:
    return "none" if not bias.get("use_position_bias", True) else "pos" if not bias.get("use_time_bias", True) else "pos+time"


def test_append_candidates_puts_each_candidate_last() -> None:
    offsets = torch.tensor([0, 2, 2, 5])
    values, new_offsets, cand = append_candidates(torch.arange(5), torch.tensor([10, 11, 12]), offsets)
    assert values.tolist() == [0, 1, 10, 11, 2, 3, 4, 12]
    assert new_offsets.tolist() == [0, 3, 4, 8] and cand.tolist() == [2, 3, 7]


def _replace_value(kjt: KeyedJaggedTensor, key: str, index: int, value: int) -> KeyedJaggedTensor:
    """A copy of `kjt` whose `index`-th value of `key` is `value`."""
    values = kjt.values().clone()
    start = int(kjt.offset_per_key()[kjt.keys().index(key)])
    values[start + index] = value
    return KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths(), stride=kjt.stride())


def test_causality_a_sample_sees_only_its_own_history_and_history_never_sees_later_tokens() -> None:
    torch.manual_seed(0)
    model = HSTURanker(config()).eval()
    b = batch(8, seed=2)
    hist_lengths = b.sparse_features["hist_item_id"].lengths()
    target = 2  # the sample with MAX_HIST behaviours
    start = int(hist_lengths[:target].sum())
    with torch.no_grad():
        base = model(b.sparse_features, b.dense_features)
        states, offsets, cand = model.encode(b.sparse_features)
        # Change sample 2's oldest behaviour: its score moves, no other sample's does.
        changed = _replace_value(b.sparse_features, "hist_item_id", start, (int(b.sparse_features["hist_item_id"].values()[start]) + 1) % ITEMS)
        moved = model(changed, b.dense_features)
        # Change every candidate: no history token's state moves (nothing sees a later token).
        other = b.sparse_features
        for i in range(8):
            other = _replace_value(other, "item_id", i, (int(b.sparse_features["item_id"].values()[i]) + 3) % ITEMS)
        states_other, _, _ = model.encode(other)
        # Change one behaviour's time: again only its own sample moves.
        timed = _replace_value(b.sparse_features, "hist_ts", start + MAX_HIST - 1, 1_600_000_000 + MAX_HIST)
        timed_scores = model(timed, b.dense_features)
    others = torch.arange(8) != target
    assert not torch.isclose(moved[target], base[target], rtol=0, atol=1e-7)
    assert torch.equal(moved[others], base[others])
    assert not torch.isclose(timed_scores[target], base[target], rtol=0, atol=1e-7)
    assert torch.equal(timed_scores[others], base[others])
    is_hist = torch.ones(states.shape[0], dtype=torch.bool)
    is_hist[cand] = False
    assert torch.equal(states_other[is_hist], states[is_hist])
    assert not torch.allclose(states_other[cand], states[cand])


def test_config_and_input_errors_name_the_key() -> None:
    model = HSTURanker(config())
    b = batch(4, seed=3, timestamps=False)
    plain = b.sparse_features
    with pytest.raises(ValueError, match="use_time_bias needs KJT keys 'sample_ts' and 'hist_ts'"):
        model(plain, b.dense_features)
    # Without the time bias the timestamps are not needed.
    assert HSTURanker(config(use_time_bias=False))(plain, b.dense_features).shape == (4,)
    with pytest.raises(ValueError, match="HSTURankerConfig: num_layers must be >= 1"):
        config(num_layers=0)
    with pytest.raises(ValueError, match="HSTUConfig: dropout must be in"):
        config(dropout=1.5)


def test_max_history_keeps_the_most_recent_behaviours() -> None:
    torch.manual_seed(0)
    short = HSTURanker(config(max_history=3)).eval()
    b = batch(6, seed=4)
    hist_lengths = b.sparse_features["hist_item_id"].lengths()
    start = int(hist_lengths[:2].sum())  # sample 2: MAX_HIST behaviours; its oldest is cut
    with torch.no_grad():
        base = short(b.sparse_features, b.dense_features)
        changed = _replace_value(b.sparse_features, "hist_item_id", start, (int(b.sparse_features["hist_item_id"].values()[start]) + 1) % ITEMS)
        recent = _replace_value(b.sparse_features, "hist_item_id", start + MAX_HIST - 1, 0)
        assert torch.equal(short(changed, b.dense_features), base)
        assert not torch.allclose(short(recent, b.dense_features)[2], base[2])


# -- warm start ------------------------------------------------------------------------------------------------------
def test_warm_start_from_the_no_lum_ranker_predicts_the_same() -> None:
    torch.manual_seed(0)
    old = HSTURanker(config())
    opt = torch.optim.Adam(old.parameters(), lr=0.01)
    for seed in range(3):
        loss = RankingTrain(old)(batch(16, seed))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(1)
    new = HSTURanker(config(LUM))
    report = warm_start(new, old.state_dict())
    in_old = old.in_features
    assert [(w.name, w.zero_columns) for w in report.widened] == [("over_arch.mlp._mlp.0._linear.weight", (in_old, in_old + LUM))]
    assert report.skipped == [] and report.missing == []
    b = batch(10, seed=7, lum_dim=LUM)
    with torch.no_grad():
        want = old(b.sparse_features, b.dense_features)
        got = new(b.sparse_features, b.dense_features, b.lum_features * 10)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# -- the rank job ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hstu_rank")
    data = make_data(root)
    store = root / "store"
    for i, day in enumerate(["2026-01-01", "2026-01-02", "2026-01-03"]):
        write_store(store, day, seed=i)
    return data, str(store)


def hstu_config(data: str, out, lum=None, **train):
    cfg = rank_config(data, out, "hstu", lum, **train)
    cfg.sizes.backbones["hstu"] = {"num_layers": 1, "hstu": {"num_heads": 2, "max_len": 21}}
    return cfg


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "train_minutes"}


def test_build_ranker_hstu_widths() -> None:
    vocab = {"user_id": 10, "item_id": 20, "category_id": 4, "scenario": 3, "query_id": 1}
    sizes = RankModelConfig(embedding_dim=4, mlp=[8], backbones={"hstu": {"num_layers": 3, "hstu": {"num_heads": 1}}})
    model, train = build_ranker("hstu", sizes, vocab, dense_dim=2, lum_dim=5)
    assert isinstance(model, HSTURanker) and isinstance(train, RankingTrain)
    assert len(model.stack.layers) == 3 and model.config.model_dim == 8
    # context (user_id, scenario: 4 each) + the candidate's state (item + category: 8) + dense + LUM
    assert model.in_features == 4 + 4 + 8 + 2 + 5


@pytest.mark.parametrize("use_lum", [False, True], ids=["base", "lum"])
def test_rank_job_trains_and_resumes_exactly(world, tmp_path, use_lum) -> None:
    data, store = world
    lum = lum_config(store) if use_lum else None
    straight = run_rank(hstu_config(data, tmp_path / "a", lum, epochs=2, checkpoint_every_steps=4))
    assert straight["model"] == "hstu" and straight["lum"] == use_lum
    losses = [h["train_loss"] for h in straight["history"]]
    assert losses[1] < losses[0]
    for split in ("test", "valid"):
        assert 0.0 <= straight[split]["auc"] <= 1.0 and np.isfinite(straight[split]["ne"])
    assert json.loads((tmp_path / "a" / "results.json").read_text())["test"] == straight["test"]
    assert (straight["lum_dim"] > 0) == use_lum
    # Killed mid-epoch after a checkpoint, then rerun: the same final result.
    mid = run_rank(hstu_config(data, tmp_path / "b", lum, epochs=2, checkpoint_every_steps=4), max_steps=6)
    assert mid["stopped"] == "max_steps" and mid["step"] == 6
    again = run_rank(hstu_config(data, tmp_path / "b", lum, epochs=2, checkpoint_every_steps=4))
    assert _strip(again) == _strip(straight)


def test_doctests() -> None:
    assert doctest.testmod(hstu_ranking_mod).failed == 0
