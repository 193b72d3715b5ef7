"""M-FALCON (modules/ranking/m_falcon.py): scores equal one pass per candidate (`HSTURanker.forward`) on random shapes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from benchmark_scripts import load_benchmark
from lumrec.modules.layers.hstu import HSTUConfig
from lumrec.modules.ranking.base import TableConfig, with_timestamps
from lumrec.modules.ranking.builder import RankModelConfig, build_ranker
from lumrec.modules.ranking.hstu_ranking import HSTURanker, HSTURankerConfig
from lumrec.modules.ranking.m_falcon import HistoryCache, MFalconScorer, per_candidate_kjt

ITEMS, CATS, USERS, BRANDS, TAGS, D, DENSE, LUM = 60, 7, 9, 5, 6, 4, 3, 5
LENGTHS, COUNTS, MICRO = [0, 1, 7, 40], [1, 5, 33], [1, 4, 64]


def config(**kw) -> HSTURankerConfig:
    """Two paired sequence keys; context: a user id, a user bag (mean), a per-candidate brand and a per-candidate tag bag.

    Keys of `HSTUConfig` in `kw` go to the layers, the others to the ranker.
    """
    layer_keys = {f.name for f in dataclasses.fields(HSTUConfig)}
    layer = dict(num_heads=2, max_len=12, num_time_buckets=20)
    layer.update({k: kw.pop(k) for k in list(kw) if k in layer_keys})
    base = dict(
        sequence_tables=[TableConfig("t_item", ITEMS, D, ["item_id", "hist_item_id"]),
                         TableConfig("t_cat", CATS, D, ["category_id", "hist_category_id"])],
        candidate_keys=["item_id", "category_id"], history_keys=["hist_item_id", "hist_category_id"],
        context_tables=[TableConfig("t_user", USERS, D, ["user_id"]),
                        TableConfig("t_tag", TAGS, D, ["tags", "hist_tags"], pooling="mean"),
                        TableConfig("t_brand", BRANDS, D, ["brand"])],
        dense_dim=DENSE, lum_dim=LUM, mlp=[8], num_layers=2, hstu=layer,
    )
    base.update(kw)
    return HSTURankerConfig(**base)


def request(cfg: HSTURankerConfig, length: int, count: int, seed: int) -> dict:
    """One user's request: history of `length` behaviours (times with gaps of seconds to days), `count` candidates."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, ITEMS, (length,), generator=g)
    history = {"hist_item_id": items, "hist_category_id": items % CATS}
    ts = 1_700_000_000 + torch.cumsum(torch.randint(1, 300_000, (length,), generator=g), 0)
    cand = torch.randint(0, ITEMS, (count,), generator=g)
    candidates = {"item_id": cand, "category_id": cand % CATS}
    context_keys = {k for t in cfg.context_tables for k in t.feature_names}
    context = {}
    if "brand" in context_keys:
        candidates["brand"] = torch.randint(0, BRANDS, (count,), generator=g)
        tag_lengths = torch.randint(0, 3, (count,), generator=g)
        candidates["tags"] = (torch.randint(0, TAGS, (int(tag_lengths.sum()),), generator=g), tag_lengths)
        context = {"user_id": torch.randint(0, USERS, (1,), generator=g),
                   "hist_tags": torch.randint(0, TAGS, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)}
    last = int(ts[-1]) if length else 1_700_000_000
    return dict(
        history=history, candidates=candidates, context=context, history_ts=ts,
        sample_ts=last + int(torch.randint(0, 500_000, (1,), generator=g)),
        dense=torch.rand(count, cfg.dense_dim, generator=g) if cfg.dense_dim else None,
        lum=torch.randn(count, cfg.lum_dim, generator=g) if cfg.lum_dim else None,
    )


def one_pass(model: HSTURanker, r: dict) -> torch.Tensor:
    """The existing path: M samples [full history, candidate] through `HSTURanker.forward`."""
    kjt = per_candidate_kjt(model.config, r["history"], r["candidates"], r["context"], r["history_ts"], r["sample_ts"])
    with torch.no_grad():
        return model(kjt, r["dense"], r["lum"])


def m_falcon(model: HSTURanker, r: dict, micro_batch: int) -> torch.Tensor:
    return MFalconScorer(model, micro_batch).score(
        r["history"], r["candidates"], r["context"], r["history_ts"], r["sample_ts"], r["dense"], r["lum"])


VARIANTS = {
    "pos+time": {},
    "pos": dict(use_time_bias=False),
    "time": dict(use_position_bias=False),
    "no-bias": dict(use_position_bias=False, use_time_bias=False),
    "max_history": dict(max_history=5),
    "normaliser-length": dict(normaliser="length", max_history=9),
    "normaliser-number": dict(normaliser=3.5, num_layers=3),
    "no-context-dense-lum": dict(context_tables=[], dense_dim=0, lum_dim=0, num_heads=1),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_scores_equal_one_pass_per_candidate(variant: str) -> None:
    cfg = config(**VARIANTS[variant])
    for seed in range(2):
        torch.manual_seed(seed)
        model = HSTURanker(cfg).eval()
        for i, length in enumerate(LENGTHS):
            for j, count in enumerate(COUNTS):
                r = request(cfg, length, count, seed=100 * seed + 10 * i + j)
                got = m_falcon(model, r, MICRO[(i + j + seed) % len(MICRO)])
                torch.testing.assert_close(got, one_pass(model, r), rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{variant} seed {seed} L {length} M {count}: {m}")


def test_a_history_longer_than_max_len_and_max_history_smaller_than_it() -> None:
    """Positions past the bias span share its last entry; max_history keeps the newest behaviours, time bias included."""
    for max_history in (None, 30):
        cfg = config(max_len=8, max_history=max_history)
        torch.manual_seed(3)
        model = HSTURanker(cfg).eval()
        r = request(cfg, 57, 9, seed=4)
        torch.testing.assert_close(m_falcon(model, r, 4), one_pass(model, r), rtol=1e-5, atol=1e-5)


def test_the_registered_ranker_with_a_pooled_candidate_feature() -> None:
    """`lumrec rank`'s HSTU (build_ranker): category_id has no history key, so it is a per-candidate pooled context key."""
    vocab = {"user_id": USERS, "item_id": ITEMS, "category_id": CATS, "scenario": 3, "query_id": 4}
    sizes = RankModelConfig(embedding_dim=4, mlp=[8], history_keys=["hist_item_id"],
                            backbones={"hstu": {"num_layers": 2, "hstu": {"num_heads": 2, "max_len": 21}}})
    torch.manual_seed(0)
    model, _ = build_ranker("hstu", sizes, vocab, dense_dim=2, lum_dim=3)
    model.eval()
    g = torch.Generator().manual_seed(5)
    items, cand = torch.randint(0, ITEMS, (12,), generator=g), torch.randint(0, ITEMS, (10,), generator=g)
    r = dict(history={"hist_item_id": items}, candidates={"item_id": cand, "category_id": cand % CATS},
             context={"user_id": torch.tensor([4]), "scenario": torch.tensor([1]), "query_id": torch.tensor([2])},
             history_ts=torch.arange(12) * 1000, sample_ts=20_000, dense=torch.rand(10, 2, generator=g),
             lum=torch.rand(10, 3, generator=g))
    torch.testing.assert_close(m_falcon(model, r, 3), one_pass(model, r), rtol=1e-5, atol=1e-5)


def test_equal_to_a_hand_built_batch() -> None:
    """The one-pass batch built without per_candidate_kjt: M samples, each carrying the full history and its times."""
    cfg = config(context_tables=[TableConfig("t_user", USERS, D, ["user_id"])])
    torch.manual_seed(1)
    model = HSTURanker(cfg).eval()
    hist, ts = torch.tensor([5, 9, 9, 31, 2]), torch.tensor([100, 160, 3_000, 90_000, 90_001])
    cand = torch.tensor([1, 9, 40])
    one = torch.ones(3, dtype=torch.int64)
    values = torch.cat([torch.tensor([7, 7, 7]), cand, cand % CATS, hist.repeat(3), (hist % CATS).repeat(3)])
    lengths = torch.cat([one, one, one, one * 5, one * 5])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["user_id", "item_id", "category_id", "hist_item_id", "hist_category_id"], values, lengths)
    kjt = with_timestamps(kjt, torch.full((3,), 100_000), ts.repeat(3), one * 5)
    dense, lum = torch.rand(3, DENSE), torch.rand(3, LUM)
    with torch.no_grad():
        want = model(kjt, dense, lum)
    got = MFalconScorer(model).score({"hist_item_id": hist, "hist_category_id": hist % CATS},
                                     {"item_id": cand, "category_id": cand % CATS}, {"user_id": torch.tensor([7])},
                                     history_ts=ts, sample_ts=100_000, dense=dense, lum=lum)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_micro_batching_does_not_change_scores_and_a_cache_serves_several_calls() -> None:
    cfg = config()
    torch.manual_seed(2)
    model = HSTURanker(cfg).eval()
    r = request(cfg, 40, 33, seed=7)
    scores = [m_falcon(model, r, m) for m in (1, 4, 64, 33)]
    for other in scores[1:]:
        torch.testing.assert_close(other, scores[0], rtol=1e-6, atol=1e-6)
    scorer = MFalconScorer(model, micro_batch=8)
    cache = scorer.encode_history(r["history"], r["history_ts"])
    assert isinstance(cache, HistoryCache) and cache.length == 40 and len(cache.keys) == len(cache.values) == 2
    kept = [k.clone() for k in cache.keys] + [v.clone() for v in cache.values]
    later = request(cfg, 40, 5, seed=8)  # another request of the same user: other candidates, a later time
    for req in (r, later, r):
        got = scorer.score_candidates(cache, req["candidates"], req["context"], req["sample_ts"], req["dense"], req["lum"])
        fresh = dict(req, history=r["history"], history_ts=r["history_ts"])
        torch.testing.assert_close(got, one_pass(model, fresh), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(kept, cache.keys + cache.values))  # scoring leaves the cache as it was


def test_bad_inputs_are_errors_naming_the_argument() -> None:
    cfg = config()
    torch.manual_seed(0)
    model = HSTURanker(cfg)
    with pytest.raises(ValueError, match="training mode; call model.eval"):
        MFalconScorer(model)
    model.eval()
    scorer = MFalconScorer(model)
    with pytest.raises(ValueError, match="micro_batch must be an int >= 1"):
        MFalconScorer(model, micro_batch=0)
    r = request(cfg, 6, 4, seed=1)

    def call(**changes):
        args = dict(r, **changes)
        return scorer.score(args["history"], args["candidates"], args["context"], args["history_ts"], args["sample_ts"],
                            args["dense"], args["lum"])

    hist, cand = r["history"], r["candidates"]
    cases = [
        (dict(history={"hist_item_id": hist["hist_item_id"]}), r"history must have exactly the keys .*missing \['hist_category_id'\]"),
        (dict(history=dict(hist, hist_category_id=hist["hist_category_id"][:3])), r"history\['hist_category_id'\] has 3 ids"),
        (dict(history=dict(hist, hist_item_id=hist["hist_item_id"].float())), r"history\['hist_item_id'\] must be a 1-D integer"),
        (dict(history=dict(hist, hist_item_id=hist["hist_item_id"] + ITEMS)), r"history\['hist_item_id'\] has ids outside \[0, 60\)"),
        (dict(candidates={k: v for k, v in cand.items() if k != "item_id"}), r"candidates must have the keys .*missing \['item_id'\]"),
        (dict(candidates=dict(cand, color=cand["item_id"])), r"unknown \['color'\]"),
        (dict(candidates=dict(cand, brand=cand["brand"][:2])), r"candidates\['brand'\] must have one id per candidate \(4\)"),
        (dict(candidates=dict(cand, tags=(cand["tags"][0], torch.tensor([9, 0, 0, 0])))), r"candidates\['tags'\] lengths"),
        (dict(context={"hist_tags": r["context"]["hist_tags"]}), r"context key 'user_id' is missing"),
        (dict(context=dict(r["context"], brand=torch.tensor([1]))), r"context key 'brand' is given both"),
        (dict(context=dict(r["context"], shop=torch.tensor([1]))), r"context has key\(s\) \['shop'\]"),
        (dict(history_ts=None), "give history_ts"),
        (dict(history_ts=r["history_ts"][:2]), r"history_ts must have one time per behaviour \(6\)"),
        (dict(sample_ts=None), "give sample_ts"),
        (dict(sample_ts=1.5), "sample_ts must be an int"),
        (dict(dense=torch.rand(3, DENSE)), r"dense must be \[4, 3\]"),
        (dict(lum=None), "lum of width 5 are required"),
    ]
    for changes, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            call(**changes)
    other = MFalconScorer(HSTURanker(config(num_layers=3)).eval())
    with pytest.raises(ValueError, match="cache was encoded by a different model"):
        scorer.score_candidates(other.encode_history(hist, r["history_ts"]), cand, r["context"], r["sample_ts"], r["dense"], r["lum"])
    model.stack.layers[1].dropout.train()
    with pytest.raises(ValueError, match=r"stack.layers.1.dropout is in training mode; call model.eval\(\)"):
        call()
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        call()


def test_benchmark_tiny_run_writes_its_results(tmp_path) -> None:
    bench = load_benchmark("m_falcon")
    out = tmp_path / "m_falcon.json"
    result = bench.main(["--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == result and saved["benchmark"] == "m_falcon" and saved["threads"] == 1
    rows = saved["results"]
    assert rows and all(row["max_abs_diff"] <= 1e-5 and row["speedup"] > 0 for row in rows)
