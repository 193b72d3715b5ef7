"""The lum_tables benchmark's configs: every data set's file parses key by key, variants inherit their parent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

from lumrec.config import from_dict
from lumrec.pipelines.rank_config import RankConfig


def _bench():
    return load_benchmark("lum_tables")


@pytest.mark.parametrize("tiny", [False, True])
def test_every_dataset_config_parses(tiny):
    bench = _bench()
    for dataset in bench.DATASETS:
        if tiny and not dataset.startswith("synthetic"):
            continue
        cfg = bench.load_bench_config(dataset, tiny)
        assert cfg.knowledge.mode in ("daily", "fixed", "user_cut"), dataset
        assert cfg.pretrain["model_config"]["d_model"] > 0
        # The rank section is a RankConfig (less data and model), SIM's options included.
        rank = from_dict(RankConfig, {**cfg.rank, "data": "unused"}, source=dataset)
        assert rank.sizes.options("sim").max_search_len >= rank.sizes.options("sim").short_len > 0, dataset


def test_strength0_variant_changes_only_the_planted_strength():
    bench = _bench()
    base, variant = bench.load_bench_config("synthetic", False), bench.load_bench_config("synthetic-strength0", False)
    assert variant.source.synth == {**base.source.synth, "condition_strength": 0.0}
    assert (variant.knowledge, variant.pretrain, variant.lum, variant.rank) == (base.knowledge, base.pretrain, base.lum, base.rank)


def test_unknown_key_in_a_config_is_named(tmp_path, monkeypatch):
    bench = _bench()
    (tmp_path / "bad.yaml").write_text("extends: synthetic.yaml\nknowledge: {pretrain_ends: '2026-01-07'}\n")
    (tmp_path / "synthetic.yaml").write_text((bench.CONFIGS / "synthetic.yaml").read_text())
    monkeypatch.setattr(bench, "CONFIGS", tmp_path)
    monkeypatch.setitem(bench.DATASETS, "bad", "bad.yaml")
    with pytest.raises(Exception, match="pretrain_ends"):
        bench.load_bench_config("bad", False)


def test_extra_rows_read_the_main_store_and_keep_their_label(tmp_path):
    bench = _bench()
    cfg = bench.load_bench_config("beauty-implicit", False)
    spec = cfg.extra_rows["unconditioned"]
    assert spec.conditions == ["none=0"] and spec.candidate_condition_feature is None and spec.label
    row = bench.lum_row_config(spec, tmp_path / "store", "2000-01-01", None)
    assert row.conditions == ["none=0"] and row.store == str(tmp_path / "store")
    assert not hasattr(row, "label")


def test_import_is_redone_when_the_options_change(tmp_path, monkeypatch):
    bench = _bench()
    calls = []

    def fake_import(kind, src, out, overwrite, **options):
        # The real importers refuse a folder holding files they did not write (lumrec.data.importers._common).
        assert not (Path(out) / "_lum_tables_import.json").exists()
        calls.append(options)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "_lumrec.json").write_text("{}")

    import lumrec.data.importers as importers

    monkeypatch.setattr(importers, "run_import", fake_import)
    spec = bench.SourceSpec(kind="amazon", src="a.txt", options={"category": "first"})
    bench.ensure_dataset(spec, tmp_path, tmp_path / "ds")
    bench.ensure_dataset(spec, tmp_path, tmp_path / "ds")  # same options: reused
    spec.options["category"] = "most_frequent"
    bench.ensure_dataset(spec, tmp_path, tmp_path / "ds")
    assert calls == [{"category": "first"}, {"category": "most_frequent"}]
    monkeypatch.chdir(tmp_path)
    bench.ensure_dataset(spec, Path("."), tmp_path / "ds")  # the same data folder, relative: reused
    assert len(calls) == 2


def test_attributes_variant_adds_only_the_list_keys():
    bench = _bench()
    base, variant = bench.load_bench_config("beauty-implicit", False), bench.load_bench_config("beauty-implicit-attributes", False)
    assert variant.rank["sizes"] == {**base.rank["sizes"], "list_keys": ["category_ids", "hist_category_ids"]}
    assert (variant.source, variant.knowledge, variant.pretrain, variant.lum) == (base.source, base.knowledge, base.pretrain, base.lum)


def test_extend_seeds_appends_new_seeds_and_pairs_the_delta_again():
    bench = _bench()
    earlier = {"base": {"seeds": 3, "auc": [0.70, 0.72, 0.71], "ne": [0.9, 0.9, 0.9]},
               "hstu-e2e": {"seeds": 2, "auc": [0.73, 0.74], "ne": [0.8, 0.8]}}
    new = {"base": {"seeds": 1, "auc": [0.71], "ne": [0.9]}, "hstu-e2e": {"seeds": 1, "auc": [0.75], "ne": [0.7]}}
    merged = bench.extend_seeds(earlier, new, first_seed=2)
    assert merged["base"]["auc"] == [0.70, 0.72, 0.71] and merged["hstu-e2e"]["auc"] == [0.73, 0.74, 0.75]
    assert merged["hstu-e2e"]["seeds"] == 3 and merged["hstu-e2e"]["delta_auc_mean"] == pytest.approx(0.03)
    moved = bench.extend_seeds(earlier, {**new, "base": {"seeds": 1, "auc": [0.7102], "ne": [0.9]}}, first_seed=2)
    assert moved["base"]["auc"] == [0.70, 0.72, 0.71] and moved["base"]["rerun_auc"] == {"first_seed": 2, "auc": [0.7102]}
    assert moved["hstu-e2e"]["delta_auc_mean"] == pytest.approx(0.03)  # still paired with the kept Base
    with pytest.raises(ValueError, match="row .hstu-e2e.: --first-seed 3 but the results hold 2"):
        bench.extend_seeds(earlier, new, first_seed=3)


def test_beauty_lum_budget_is_chosen_on_validation():
    bench = _bench()
    for dataset in ("beauty-implicit", "beauty-implicit-fine", "beauty-implicit-attributes"):
        assert bench.load_bench_config(dataset, False).lum_budget.select_on == "validation", dataset
    assert bench.load_bench_config("ml1m-ratings", False).lum_budget.select_on == "time"
    with pytest.raises(ValueError, match="select_on"):
        bench.LumBudgetSpec(select_on="steps")


def test_validation_probe_sets_the_lums_epochs(tmp_path):
    """A real probe on tiny synthetic logs: the LUM then trains exactly the probe's best number of epochs."""
    from lumrec.data.synthetic import SynthConfig, ensure_generated

    bench = _bench()
    cfg = bench.load_bench_config("synthetic", True)
    data = tmp_path / "data"
    ensure_generated(data, SynthConfig(**cfg.source.synth))
    cfg.pretrain = bench.deep_merge(cfg.pretrain, {"train": {"epochs": 4, "rows_per_batch": 64, "checkpoint_every_steps": 1000}})
    cfg.lum_budget = bench.LumBudgetSpec(select_on="validation", eval_every_epochs=1, patience=1)
    result = bench.pretrain_lum(cfg, data, tmp_path / "lum", cfg.knowledge.pretrain_end, bench.LumBudget(), threads=1)
    probe = result["budget_probe"]
    assert 0 <= probe["best_epoch"] < 4 and probe["epochs"] == probe["best_epoch"] + 1
    assert result["epochs"] == probe["epochs"]  # the LUM itself trains the chosen number of epochs
    assert (tmp_path / "lum" / "budget-probe" / "results.json").exists()
    saved = (tmp_path / "lum" / "budget-probe" / "config.json").read_text()
    assert '"train_excludes_last": 2' in saved  # the probe held the validation event out


def test_lum_budget_is_steps_by_default_and_the_command_line_overrides_it():
    """Without --steps/--epochs/--minutes a recorded config's LUM trains its lum_budget.steps, the same on any machine."""
    import argparse

    bench = _bench()
    args = lambda **kw: argparse.Namespace(**{"steps": None, "epochs": None, "minutes": None, "tiny": False, **kw})  # noqa: E731
    ml1m = bench.load_bench_config("ml1m-ratings", False)
    assert bench.resolve_budget(args(), ml1m) == bench.LumBudget(steps=2315, source="config lum_budget.steps")
    assert bench.resolve_budget(args(steps=7), ml1m).steps == 7
    assert bench.resolve_budget(args(epochs=3), ml1m) == bench.LumBudget(epochs=3, source="--epochs")
    assert bench.resolve_budget(args(minutes=2.5), ml1m) == bench.LumBudget(minutes=2.5, source="--minutes")
    tiny = bench.load_bench_config("synthetic", True)
    assert bench.resolve_budget(args(tiny=True), tiny).steps == tiny.tiny["pretrain_steps"]
    beauty = bench.load_bench_config("beauty-implicit", False)  # chosen on validation: the probe's epochs, no wall clock
    budget = bench.resolve_budget(args(), beauty)
    assert (budget.steps, budget.minutes, budget.epochs) == (0, 0.0, beauty.pretrain["train"]["epochs"])
    for name in bench.DATASETS:  # every named config's default is a budget in steps or epochs
        b = bench.resolve_budget(args(), bench.load_bench_config(name, False))
        assert b.minutes == 0.0 and (b.steps or b.epochs), name
    with pytest.raises(SystemExit):
        bench.main(["--steps", "5", "--minutes", "3"])


def test_selection_on_validation_ignores_rows_without_lum_and_test_auc():
    bench = _bench()
    summary = {
        "base": {"valid_auc_mean": 0.99, "auc_mean": 0.70, "auc_std": 0.0},
        "hstu-e2e": {"valid_auc_mean": 0.98, "auc_mean": 0.72, "auc_std": 0.0},
        "lum": {"valid_auc_mean": 0.80, "auc_mean": 0.75, "auc_std": 0.01, "delta_auc_mean": 0.05, "delta_auc_std": 0.01},
        "no-condition": {"valid_auc_mean": 0.81, "auc_mean": 0.71, "auc_std": 0.01, "delta_auc_mean": 0.01, "delta_auc_std": 0.01},
        "matching": {"auc_mean": 0.90, "auc_std": 0.0},  # an earlier invocation's row without validation AUC
    }
    picked = bench.select_on_validation(summary)
    assert picked["row"] == "no-condition" and picked["candidates"] == ["lum", "no-condition"]
    assert picked["delta_auc_mean"] == 0.01
    assert bench.select_on_validation({"base": summary["base"]}) is None


def test_summaries_keep_the_validation_auc_through_extended_seeds():
    from lumrec.comparison import summarize_seeds

    bench = _bench()
    first = summarize_seeds({"base": [{"test": {"auc": 0.7, "ne": 0.9}, "valid": {"auc": 0.8}}],
                             "lum": [{"test": {"auc": 0.72, "ne": 0.9}, "valid": {"auc": 0.82}}]})
    assert first["lum"]["valid_auc"] == [0.82]
    new = summarize_seeds({"base": [{"test": {"auc": 0.71, "ne": 0.9}, "valid": {"auc": 0.81}}],
                           "lum": [{"test": {"auc": 0.74, "ne": 0.9}, "valid": {"auc": 0.84}}]})
    merged = bench.extend_seeds(first, new, first_seed=1)
    assert merged["lum"]["valid_auc"] == [0.82, 0.84] and merged["lum"]["valid_auc_mean"] == pytest.approx(0.83)


def test_fresh_redoes_only_what_the_invocation_reruns(tmp_path):
    """--fresh (forced by --tiny) empties the runs an invocation redoes; other rows' LUM, store and runs stay."""
    bench = _bench()
    args = ["--tiny", "--seeds", "1", "--out", str(tmp_path / "out"), "--results", str(tmp_path / "r.json")]
    assert bench.main(args) == 0
    work = tmp_path / "out" / "lum_tables" / "synthetic-tiny-sim"
    markers = [work / "lum" / "marker", work / "store" / "marker", work / "rank" / "lum" / "seed0" / "marker",
               work / "rank" / "base" / "seed0" / "marker"]
    for marker in markers:
        marker.write_text("earlier invocation")
    assert bench.main([*args, "--rows", "base"]) == 0  # Base alone needs no LUM
    assert [m.exists() for m in markers] == [True, True, True, False]
    rows = json.loads((tmp_path / "r.json").read_text())["synthetic-tiny/sim"]
    assert rows["rows_kept_from_earlier_invocation"] == ["lum"]


def _tiny_data_and_config(tmp_path, **lum):
    """Tiny synthetic logs in a folder of their own and a copy of the synthetic config outside configs/ (lum keys changed)."""
    import yaml

    from lumrec.data.synthetic import SynthConfig, ensure_generated

    bench = _bench()
    raw = yaml.safe_load((bench.CONFIGS / "synthetic.yaml").read_text())
    ensure_generated(tmp_path / "logs", SynthConfig(**raw["tiny"]["source"]["synth"]))
    raw["lum"] = {**raw["lum"], **lum}
    config = tmp_path / "elsewhere" / "my_lum.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(raw))
    return bench, tmp_path / "logs", config


def test_a_data_dir_with_a_config_anywhere_runs_tiny_and_writes_outside_the_repository(tmp_path):
    bench, data, config = _tiny_data_and_config(tmp_path)
    recorded = bench.RESULTS.read_bytes() if bench.RESULTS.exists() else None
    out = tmp_path / "out"
    assert bench.main(["--tiny", "--seeds", "1", "--data-dir", str(data), "--config", str(config), "--out", str(out),
                       "--model", "din", "--steps", "5"]) == 0
    rows = json.loads((out / "results" / "lum_tables.json").read_text())  # the default results file sits under --out
    row = rows["logs+my_lum-tiny/din"]
    assert row["config"] == str(config) and row["data_dir"] == str(data) and row["dataset"] == "logs+my_lum"
    assert row["budget"] == {"minutes": None, "epochs": None, "steps": 5, "from": "--steps"} and row["pretrain"]["lum"]["steps"] == 5
    assert set(row["rows"]) == {"base", "lum"}
    assert (bench.RESULTS.read_bytes() if bench.RESULTS.exists() else None) == recorded  # recorded tables untouched
    assert not (out / "synthetic-tiny").exists()  # --data-dir is read as it is, not imported


@pytest.mark.parametrize("lum, named", [
    ({"conditions": ["color=1"]}, r"my_lum.yaml: lum.conditions: feature 'color' is not in data set .*behaviours columns \["),
    ({"conditions": ["scenario=9"]}, r"lum.conditions: condition 'scenario=9': data set .* has scenario ids 1..2 \(vocabulary size 3\)"),
    ({"candidate_condition_feature": "brand_id"}, r"lum.candidate_condition_feature: feature 'brand_id' is not in data set"),
])
def test_a_condition_the_data_lacks_stops_the_run_before_the_lum_trains(tmp_path, lum, named):
    bench, data, config = _tiny_data_and_config(tmp_path, **lum)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=named):
        bench.main(["--tiny", "--seeds", "1", "--data-dir", str(data), "--config", str(config), "--out", str(out)])
    assert not (out / "lum_tables" / "logs+my_lum-tiny-sim" / "lum").exists()  # nothing trained


def test_every_named_condition_of_the_recorded_configs_is_one_the_lum_is_asked():
    """The configs' own conditions are consistent with their knowledge and pre-training sections (no data needed)."""
    bench = _bench()
    checks = load_benchmark("lum_tables_checks")
    for dataset in bench.DATASETS:
        cfg = bench.load_bench_config(dataset, False)
        features = {c["feature"] for c in cfg.knowledge.conditions}
        trained = set(cfg.pretrain["data"]["condition_features"])
        assert features - checks.TOKEN_FEATURES <= trained, dataset
        for spec in [cfg.lum, cfg.single_condition, *cfg.extra_rows.values()]:
            assert {c.split("=")[0] for c in spec.conditions} <= features, dataset
            assert spec.candidate_condition_feature in features | {None}, dataset


def test_a_code_the_data_never_uses_is_named_with_the_codes_it_does(tmp_path):
    """An id inside the vocabulary that no behaviour carries (a hard-coded attribute code of another import) is refused."""
    _, data, _ = _tiny_data_and_config(tmp_path)
    checks = load_benchmark("lum_tables_checks")
    facts = checks.DataFacts.of(data)
    checks.check_condition_text("scenario=2", "lum.conditions", facts, "my.yaml")
    facts.vocab["scenario"] = 10  # as if the vocabulary reserved codes this data set does not use
    with pytest.raises(checks.ConfigMismatch, match=r"my.yaml: lum.conditions: condition 'scenario=7': no behaviour of data set "
                                                    r".* has scenario 7; its most frequent scenario ids are \[[12], [12]\]"):
        checks.check_condition_text("scenario=7", "lum.conditions", facts, "my.yaml")


def test_an_import_spec_is_imported_then_checked_against_the_config_before_training(tmp_path):
    """`--import amazon FILE` imports the file under --out; the synthetic config's conditions do not fit reviews and stop the run."""
    bench, _, config = _tiny_data_and_config(tmp_path)
    reviews = tmp_path / "src" / "Toys.txt"
    reviews.parent.mkdir()
    reviews.write_text("".join(f"{u} " + " ".join(str(1 + (u + k) % 12) for k in range(8)) + "\n" for u in range(1, 21)))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"my_lum.yaml: pretrain.data.condition_features: feature 'query_id' is not in data set Toys .*"
                                         r"behaviours columns \['action', 'category_id'"):
        bench.main(["--tiny", "--seeds", "1", "--import", "amazon", str(reviews), "--config", str(config), "--out", str(out)])
    assert (out / "Toys+my_lum-tiny" / "_lumrec.json").exists()  # imported under --out
    assert not (out / "lum_tables" / "Toys+my_lum-tiny-sim" / "lum").exists()  # nothing trained
