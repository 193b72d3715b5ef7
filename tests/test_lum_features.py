"""LUMFeatureModule against a per-candidate Python reference over an in-memory knowledge source."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from lumrec.data.dataset import Dataset
from lumrec.data.synthetic import SynthConfig, generate
from lumrec.knowledge import write_knowledge
from lumrec.modules.lum_features import (
    KnowledgeSource,
    LUMFeatureConfig,
    LUMFeatureModule,
    candidates_kjt,
    lum_dense_input,
)

DIM = 4


class FakeKnowledge:
    """A dict-backed KnowledgeSource: (user, feature, value) -> o_q and item -> e_i; anything else is missing."""

    def __init__(self, seed: int = 0, num_users: int = 12, num_items: int = 20, dim: int = DIM) -> None:
        g = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.users: dict[tuple[int, str, int], torch.Tensor] = {}
        for u in range(1, num_users):
            for feature, values in (("category_id", range(1, 6)), ("scenario", (1, 2))):
                for v in values:
                    if torch.rand(1, generator=g).item() < 0.8:  # some (user, condition) pairs were never stored
                        self.users[(u, feature, v)] = torch.randn(dim, generator=g)
        self.items = {i: torch.randn(dim, generator=g) for i in range(1, num_items) if i % 7 != 0}
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def user_vectors(self, user_ids, feature, values):
        self.calls.append((feature, tuple(values.shape)))
        vec = torch.full((*values.shape, self.dim), float("nan"))  # garbage where missing: the module must zero it
        missing = torch.ones(values.shape, dtype=torch.bool)
        for b in range(values.shape[0]):
            for n in range(values.shape[1]):
                key = (int(user_ids[b]), feature, int(values[b, n]))
                if key in self.users:
                    vec[b, n] = self.users[key]
                    missing[b, n] = False
        return vec, missing

    def item_vectors(self, item_ids):
        flat = item_ids.reshape(-1).tolist()
        vec = torch.stack([self.items.get(i, torch.zeros(self.dim)) for i in flat]) if flat else torch.zeros(0, self.dim)
        missing = torch.tensor([i not in self.items for i in flat], dtype=torch.bool)
        return vec.reshape(*item_ids.shape, self.dim), missing.reshape(item_ids.shape)


def _reference(kb: FakeKnowledge, config: LUMFeatureConfig, user_ids, items, lengths, cats):
    """Per candidate, in plain Python: the expected output row split by key."""
    rows: list[dict[str, list[float]]] = []
    t = 0
    for b, n in enumerate(lengths):
        u = user_ids[b]
        for _ in range(n):
            item, cat = items[t], (cats[t] if cats is not None else None)
            conds = [(f, v, n) for f, v in config.conditions for n in [f"{f}={v}"]]
            if config.candidate_condition_feature is not None:
                conds.append((config.candidate_condition_feature, cat, "candidate"))
            e = kb.items.get(item)
            row: dict[str, list[float]] = {}
            miss = []
            sims = {}
            for f, v, name in conds:
                o = kb.users.get((u, f, v))
                row[f"lum_oq_{name}"] = [0.0] * DIM if o is None else o.tolist()
                miss.append(float(o is None))
                if o is None or e is None:
                    sims[name] = 0.0
                else:
                    sims[name] = float(o @ e) / math.sqrt(float(o @ o) * float(e @ e))
            row["lum_item"] = [0.0] * DIM if e is None else e.tolist()
            for name, s in sims.items():
                row[f"lum_sim_{name}"] = [s]
            row["lum_missing"] = miss + [float(e is None)]
            rows.append(row)
            t += 1
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_match_per_candidate_reference(seed):
    kb = FakeKnowledge(seed)
    config = LUMFeatureConfig(conditions=[("scenario", 2), ("category_id", 3), ("scenario", 1)], candidate_condition_feature="category_id")
    module = LUMFeatureModule(config, kb)
    g = torch.Generator().manual_seed(100 + seed)
    batch = 7
    lengths = torch.randint(0, 4, (batch,), generator=g)
    lengths[0], lengths[1] = 0, 1  # no candidates / one candidate
    total = int(lengths.sum())
    user_ids = torch.randint(0, 14, (batch,), generator=g)  # 0 and 12, 13: users the store never saw
    items = torch.randint(0, 22, (total,), generator=g)  # 0, 7, 14, 21: items never seen
    cats = torch.randint(0, 7, (total,), generator=g)
    out = module(user_ids, candidates_kjt(items, lengths, cats))
    assert isinstance(out, KeyedTensor)
    assert out.keys() == [
        "lum_oq_scenario=2", "lum_oq_category_id=3", "lum_oq_scenario=1", "lum_oq_candidate", "lum_item",
        "lum_sim_scenario=2", "lum_sim_category_id=3", "lum_sim_scenario=1", "lum_sim_candidate", "lum_missing",
    ]
    assert out.values().shape == (total, module.output_dim) == (total, 5 * DIM + 4 + 5)
    assert module.missing_columns == ["user:scenario=2", "user:category_id=3", "user:scenario=1", "user:candidate", "item"]
    assert torch.isfinite(out.values()).all()
    assert not out.values().requires_grad and not list(module.parameters())
    ref = _reference(kb, config, user_ids.tolist(), items.tolist(), lengths.tolist(), cats.tolist())
    got = out.to_dict()
    for t, row in enumerate(ref):
        for key, expected in row.items():
            torch.testing.assert_close(got[key][t], torch.tensor(expected), atol=1e-5, rtol=1e-5, msg=f"row {t} key {key}")
    # Fixed conditions: one call per feature for all users (not per candidate).
    assert ("scenario", (batch, 2)) in kb.calls and ("category_id", (batch, 1)) in kb.calls


def test_ranking_case_one_candidate_per_sample_and_feature_subsets():
    kb = FakeKnowledge(3)
    user_ids = torch.tensor([1, 2, 3, 99])
    items = torch.tensor([1, 7, 3, 4])
    cats = torch.tensor([1, 2, 3, 4])
    kjt = candidates_kjt(items, condition_values=cats)
    only_sim = LUMFeatureModule(LUMFeatureConfig(candidate_condition_feature="category_id", features=["sim"]), kb)
    out = only_sim(user_ids, kjt)
    assert out.keys() == ["lum_sim_candidate"] and out.values().shape == (4, 1)
    assert out.values()[1].item() == 0.0 and out.values()[3].item() == 0.0  # item 7 and user 99 are unknown
    items_only = LUMFeatureModule(LUMFeatureConfig(features=["item", "missing"]), kb)
    out = items_only(user_ids, KeyedJaggedTensor.from_lengths_sync(["item_id"], items, torch.ones(4, dtype=torch.int32)))
    assert out.keys() == ["lum_item", "lum_missing"] and out["lum_missing"].flatten().tolist() == [0.0, 1.0, 0.0, 0.0]
    assert items_only.missing_columns == ["item"]
    # Dense input helper: [dense | lum], widths add up.
    dense = torch.randn(4, 3)
    assert lum_dense_input(dense, out).shape == (4, 3 + DIM + 1)


def test_missing_everything_gives_zeros_and_flags():
    kb = FakeKnowledge(0)
    module = LUMFeatureModule(LUMFeatureConfig(conditions=[("scenario", 1)], candidate_condition_feature="category_id"), kb)
    out = module(torch.tensor([0, 500]), candidates_kjt(torch.tensor([0, 7, 14]), torch.tensor([1, 2]), torch.tensor([0, 99, 3])))
    d = out.to_dict()
    assert torch.all(d["lum_missing"] == 1.0)
    for key, value in d.items():
        if key != "lum_missing":
            assert torch.all(value == 0.0), key
    # An empty batch works too.
    empty = module(torch.zeros(0, dtype=torch.int64), candidates_kjt(torch.zeros(0, dtype=torch.int64), torch.zeros(0), torch.zeros(0)))
    assert empty.values().shape == (0, module.output_dim)


def test_user_and_item_features_for_two_towers():
    kb = FakeKnowledge(1)
    module = LUMFeatureModule(LUMFeatureConfig(conditions=[("category_id", 2), ("scenario", 1)]), kb)
    users = module.user_features(torch.tensor([1, 2, 50]))
    assert users.keys() == ["lum_oq_category_id=2", "lum_oq_scenario=1", "lum_missing"]
    for b, u in enumerate([1, 2, 50]):
        for c, (f, v) in enumerate([("category_id", 2), ("scenario", 1)]):
            o = kb.users.get((u, f, v))
            torch.testing.assert_close(users[f"lum_oq_{f}={v}"][b], torch.zeros(DIM) if o is None else o)
            assert users["lum_missing"][b, c].item() == float(o is None)
    items = module.item_features(torch.tensor([1, 7]))
    assert items.values().shape == (2, DIM + 1) and items["lum_missing"].flatten().tolist() == [0.0, 1.0]


@pytest.mark.parametrize("module", ["lumrec.modules.lum_features", "lumrec.modules.lum_join"])
def test_doctests(module):
    assert doctest.testmod(importlib.import_module(module), raise_on_error=True).attempted > 0


def test_fake_is_a_knowledge_source():
    assert isinstance(FakeKnowledge(), KnowledgeSource)


def test_bad_config_and_input_errors_name_the_key():
    kb = FakeKnowledge(0)
    with pytest.raises(ValueError, match="unknown feature group 'similarity'"):
        LUMFeatureConfig(conditions=[("scenario", 1)], features=["oq", "similarity"])
    with pytest.raises(ValueError, match="need at least one condition"):
        LUMFeatureConfig(features=["oq"])
    with pytest.raises(ValueError, match="value of 'scenario' must be an integer"):
        LUMFeatureConfig(conditions=[("scenario", "feed")])
    assert LUMFeatureConfig(conditions=["scenario=2", ["category_id", 3]]).conditions == [("scenario", 2), ("category_id", 3)]
    with pytest.raises(ValueError, match=r"\('scenario', 1\)\] listed more than once"):
        LUMFeatureConfig(conditions=[("scenario", 1), "scenario=1"])
    with pytest.raises(TypeError, match="has no 'dim', 'user_vectors', 'item_vectors'"):
        LUMFeatureModule(LUMFeatureConfig(conditions=[("scenario", 1)]), object())
    module = LUMFeatureModule(LUMFeatureConfig(candidate_condition_feature="category_id"), kb)
    with pytest.raises(ValueError, match="no key 'category_id'"):
        module(torch.tensor([1]), candidates_kjt(torch.tensor([1])))
    with pytest.raises(ValueError, match="no key 'item_id'"):
        module(torch.tensor([1]), KeyedJaggedTensor.from_lengths_sync(["item"], torch.tensor([1]), torch.tensor([1])))
    with pytest.raises(ValueError, match="stride 2 but there are 1 user ids"):
        module(torch.tensor([1]), candidates_kjt(torch.tensor([1, 2]), condition_values=torch.tensor([1, 2])))
    bad = KeyedJaggedTensor.from_lengths_sync(
        ["item_id", "category_id"], torch.tensor([1, 2, 3]), torch.tensor([1, 2], dtype=torch.int32)
    )
    with pytest.raises(ValueError, match="'category_id' must hold exactly one value per candidate"):
        module(torch.tensor([1]), bad)

    class WrongShape(FakeKnowledge):
        def user_vectors(self, user_ids, feature, values):
            vec, miss = super().user_vectors(user_ids, feature, values)
            return vec[..., :2], miss

    with pytest.raises(ValueError, match=r"user_vectors\(feature='category_id'\) returned vectors"):
        LUMFeatureModule(module.config, WrongShape())(
            torch.tensor([1]), candidates_kjt(torch.tensor([1]), condition_values=torch.tensor([1]))
        )


def _load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "plug_into_torchrec_dlrm.py"
    spec = importlib.util.spec_from_file_location("plug_into_torchrec_dlrm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torchrec_dlrm_example_runs(tmp_path, capsys):
    example = _load_example()
    tiny = ["--num-users", "150", "--num-items", "80", "--epochs", "1", "--batch-size", "128", "--log-every", "5"]
    results = example.main(tiny + ["--data", str(tmp_path / "synth")])
    for name in ("lum", "baseline"):
        assert 0.0 <= results[name]["auc"] <= 1.0 and math.isfinite(results[name]["final_train_loss"]), name
    # The DLRM's dense input grew by exactly the LUM module's width (3 item statistics otherwise).
    assert results["baseline"]["dense_in_features"] == 3
    assert results["lum"]["dense_in_features"] == 3 + 3 * 16 + 16 + 3 + 4
    printed = capsys.readouterr().out
    assert "[dlrm+lum]" in printed and "eval AUC" in printed
    # Any KnowledgeSource plugs in through main(knowledge=...).
    seen = []
    out = example.main(tiny + ["--no-baseline"], knowledge=lambda ds: seen.append(ds) or FakeKnowledge(0))
    assert set(out) == {"lum"} and len(seen) == 2 and out["lum"]["dense_in_features"] == 3 + 3 * DIM + DIM + 3 + 4


def test_public_import_from_lumrec():
    """`from lumrec import LUMFeatureModule` works and is the module's class."""
    # Imported here: the lazy attribute of `lumrec` is what is tested.
    import lumrec
    from lumrec import LUMFeatureModule
    from lumrec.modules.lum_features import LUMFeatureModule as Direct

    assert LUMFeatureModule is Direct
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        getattr(lumrec, "Nope")


def test_torchrec_dlrm_example_reads_a_knowledge_store(tmp_path):
    """`--store` feeds step 2's store in, as of the day before each day used."""
    example = _load_example()
    data = tmp_path / "synth"
    meta = generate(data, SynthConfig(seed=0, num_users=150, num_items=80, num_days=3, impressions_per_user_day=15.0))
    days = Dataset(data).days("impressions")
    users = torch.arange(1, meta.vocab_sizes["user_id"])
    conditions = ["scenario=1", "scenario=2"] + [f"category_id={c}" for c in range(1, meta.vocab_sizes["category_id"])]
    items = torch.arange(1, meta.vocab_sizes["item_id"])
    g = torch.Generator().manual_seed(0)
    for as_of in days[:2]:
        write_knowledge(tmp_path / "store", as_of, "test", users, conditions,
                        torch.randn(len(users), len(conditions), 8, generator=g), items, torch.randn(len(items), 8, generator=g))
    tiny = ["--num-users", "150", "--num-items", "80", "--epochs", "1", "--batch-size", "128", "--no-baseline"]
    out = example.main(tiny + ["--data", str(data), "--store", str(tmp_path / "store")])
    assert out["lum"]["dense_in_features"] == 3 + 3 * 8 + 8 + 3 + 4
    with pytest.raises(SystemExit, match="no complete knowledge partition before"):
        example.main(tiny + ["--data", str(data), "--store", str(tmp_path / "empty")])


def test_normalize_scales_direct_features_to_unit_length_and_keeps_missing_zero():
    kb = FakeKnowledge(2)
    user_ids, items, cats = torch.tensor([1, 2, 99]), torch.tensor([1, 7, 3]), torch.tensor([1, 2, 3])
    kjt = candidates_kjt(items, condition_values=cats)
    config = dict(conditions=[("scenario", 1)], candidate_condition_feature="category_id")
    raw = LUMFeatureModule(LUMFeatureConfig(**config), kb)(user_ids, kjt).to_dict()
    unit = LUMFeatureModule(LUMFeatureConfig(**config, normalize=True), kb)(user_ids, kjt).to_dict()
    for key in ("lum_oq_scenario=1", "lum_oq_candidate", "lum_item"):
        for row in range(3):
            r = raw[key][row]
            expected = torch.zeros(DIM) if torch.all(r == 0) else r / r.norm()  # missing rows stay zero
            torch.testing.assert_close(unit[key][row], expected)
    for key in ("lum_sim_scenario=1", "lum_sim_candidate", "lum_missing"):  # cosine and flags do not change
        torch.testing.assert_close(unit[key], raw[key])
    module = LUMFeatureModule(LUMFeatureConfig(conditions=[("scenario", 1)], normalize=True), kb)
    users, item_rows = module.user_features(torch.tensor([1, 2])), module.item_features(torch.tensor([1, 7]))
    for vec in (users["lum_oq_scenario=1"], item_rows["lum_item"]):
        norms = vec.norm(dim=1)
        assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))
