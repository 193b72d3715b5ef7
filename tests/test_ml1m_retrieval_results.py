"""The ML-1M retrieval benchmark's results file: a row keeps every seed's run and averages them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark


def _bench():
    return load_benchmark("ml1m_retrieval")


def run(hr: float, epochs: int) -> dict:
    test = {"hr@10": hr, "ndcg@10": hr / 2, "hr@50": 2 * hr, "hr@200": 3 * hr, "ndcg@200": hr}
    return {"label": "SASRec", "test": test, "epochs_run": epochs, "train_minutes": 45.0,
            "wall_minutes": 45.2, "tokens_per_s": 30000.0, "mfu": 0.25, "matmul_peak_gflops": 150.0, "overrides": []}


def test_a_second_seed_is_averaged_with_an_earlier_single_run_row():
    bench = _bench()
    earlier = {**run(0.28, 120), "note": "seed 0 alone"}
    merged = bench.with_seed(earlier, run(0.30, 140), seed=1)
    assert merged["seeds"] == [0, 1] and merged["note"] == "seed 0 alone"
    assert merged["test"]["hr@10"] == pytest.approx(0.29) and merged["epochs_run"] == pytest.approx(130)
    assert merged["per_seed"]["0"]["test"]["hr@10"] == 0.28 and merged["per_seed"]["1"]["test"]["hr@10"] == 0.30
    assert merged["test_std"]["hr@10"] == pytest.approx(0.0141421, abs=1e-6)
    again = bench.with_seed(merged, run(0.32, 150), seed=1)  # a rerun of seed 1 replaces it
    assert again["seeds"] == [0, 1] and again["test"]["hr@10"] == pytest.approx(0.30)
    alone = bench.with_seed(None, run(0.31, 100), seed=0)
    assert alone["seeds"] == [0] and alone["test"]["hr@10"] == 0.31 and "test_std" not in alone
    print(bench.format_table({"sasrec": merged}))


def test_recipe_variants_are_rows_of_their_own_listed_after_their_model():
    bench = _bench()
    rows = {"hstu@decay-0.5": {**run(0.31, 130), "label": "HSTU [decay-0.5]"}, "sasrec": run(0.28, 120),
            "hstu": {**run(0.30, 110), "label": "HSTU"}}
    lines = bench.format_table(rows).splitlines()[2:]
    assert [line.split()[0] for line in lines] == ["SASRec", "HSTU", "HSTU"]
    assert "[decay-0.5]" in lines[2] and "0.3097" in lines[2]  # the variant sits beside its model's published figure
    with pytest.raises(SystemExit):  # overrides without a variant name would mix recipes in one row
        bench.main(["--model", "hstu", "train.lr=0.001"])


def _recipe(**train) -> dict:
    return {"model": "hstu", "data": {"max_len": 200}, "train": {"lr": 0.003, "threads": 2, "max_minutes": 45.0, **train},
            "model_config": {}}


def test_seeds_of_another_recipe_are_refused_before_training(tmp_path):
    bench = _bench()
    row = bench.with_seed(None, {**run(0.30, 120), "threads": 2, "budget_minutes": 45.0, "recipe": _recipe()}, seed=0)
    assert bench.recipe_conflicts(row, _recipe(), seed=1) == []
    conflicts = bench.recipe_conflicts(row, _recipe(lr=0.001, threads=1), seed=1)
    assert conflicts == ["seed 0 ran with train.lr=0.003, this run has 0.001",
                         "seed 0 ran with train.threads=2, this run has 1"]
    assert bench.recipe_conflicts(row, _recipe(lr=0.001), seed=0) == []  # a rerun of seed 0 replaces it
    # A row written before recipes were recorded is checked on its threads and budget.
    old = {**run(0.30, 120), "threads": 2, "budget_minutes": 45.0, "per_seed": {"0": run(0.30, 120)}}
    assert bench.recipe_conflicts(old, _recipe(lr=0.001), seed=1) == []
    assert bench.recipe_conflicts(old, _recipe(max_minutes=22.0), seed=1) == [
        "seed 0 ran with train.max_minutes=45.0, this run has 22.0"]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"hstu": row}))
    with pytest.raises(SystemExit, match=r"results.json: row 'hstu' holds seeds of another recipe \(seed 0 ran with train.lr"):
        bench.refuse_mixed_recipes(results, "hstu", bench.read_row(results, "hstu"), _recipe(lr=0.001), seed=1)
    bench.refuse_mixed_recipes(results, "hstu@lr", bench.read_row(results, "hstu@lr"), _recipe(lr=0.001), seed=1)  # a row of its own is fine


def test_the_benchmark_refuses_a_mixed_seed_before_it_touches_data_or_runs(tmp_path):
    bench = _bench()
    results = tmp_path / "results.json"
    row = {**run(0.30, 120), "threads": 1, "budget_minutes": 45.0}
    results.write_text(json.dumps({"hstu": row}))
    run_dir = tmp_path / "out" / "runs" / "hstu-seed1"
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit, match="train.threads=1, this run has 2"):
        bench.main(["--model", "hstu", "--seed", "1", "--threads", "2", "--fresh", "--data", str(tmp_path / "no-data"),
                    "--out", str(tmp_path / "out"), "--results", str(results)])
    assert (run_dir / "checkpoints").exists() and not (tmp_path / "out" / "ml-1m").exists()


def test_a_row_is_saved_beside_its_run_before_it_is_merged(tmp_path):
    bench = _bench()
    results = tmp_path / "results.json"
    mine = {**run(0.31, 100), "threads": 2, "budget_minutes": 45.0, "recipe": _recipe()}
    bench.publish_row(results, "hstu", mine, 0, bench.format_table, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "benchmark_row.json").read_text())
    assert saved["key"] == "hstu" and saved["row"]["test"]["hr@10"] == 0.31
    assert json.loads(results.read_text())["hstu"]["per_seed"]["0"]["recipe"] == _recipe()
    other = {**mine, "recipe": _recipe(lr=0.001)}  # as if another invocation had written seed 0 during training
    with pytest.raises(SystemExit, match=r"train.lr=0.003, this run has 0.001.*row is kept in .*run2.benchmark_row.json"):
        bench.publish_row(results, "hstu", other, 1, bench.format_table, tmp_path / "run2")
    assert json.loads((tmp_path / "run2" / "benchmark_row.json").read_text())["row"]["recipe"] == _recipe(lr=0.001)
    assert json.loads(results.read_text())["hstu"]["seeds"] == [0]


def _tiny_logs_and_config(tmp_path):
    """Tiny synthetic logs (a lumrec data set that is not ML-1M) and a small SASRec config outside configs/."""
    import yaml

    from lumrec.data.synthetic import SynthConfig, ensure_generated

    ensure_generated(tmp_path / "logs", SynthConfig(seed=0, num_users=60, num_items=40, num_categories=4, num_queries=5, num_days=3,
                                                     impressions_per_user_day=4))
    config = tmp_path / "elsewhere" / "small_sasrec.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({
        "model": "sasrec", "out": "unused",
        "data": {"path": "unused", "train_excludes_last": 1, "max_len": 16, "item_features": ["item_id"]},
        "train": {"epochs": 50, "rows_per_batch": 32, "lr": 0.003, "num_negatives": -1, "eval_every_epochs": 1, "patience": 5,
                  "max_minutes": 45, "checkpoint_every_steps": 1000},
        "model_config": {"d_model": 8, "num_blocks": 1, "num_heads": 1, "dropout": 0.0}}))
    return tmp_path / "logs", config


def test_any_data_set_and_config_run_with_an_epoch_budget_and_write_outside_the_repository(tmp_path):
    bench = _bench()
    data, config = _tiny_logs_and_config(tmp_path)
    recorded = bench.RESULTS.read_bytes()
    out = tmp_path / "out"
    assert bench.main(["--model", "sasrec", "--data-dir", str(data), "--config", str(config), "--epochs", "1", "--threads", "1",
                       "--out", str(out)]) == 0
    rows = json.loads((out / "results" / "retrieval.json").read_text())
    row = rows["logs/sasrec+small_sasrec"]
    assert row["dataset"] == "logs" and row["config"] == str(config) and row["data_dir"] == str(data)
    assert row["epochs_run"] == 1 and row["budget_epochs"] == 1 and row["budget_minutes"] is None
    assert row["recipe"]["train"]["max_minutes"] == 0 and row["published_hr@10_ndcg@10"] is None  # no published figure off ML-1M
    assert row["label"] == "SASRec, small_sasrec on logs"
    line = [line for line in bench.format_table(rows).splitlines() if line.startswith("SASRec, small_sasrec")][0]
    assert " - " in line  # no published column
    assert bench.RESULTS.read_bytes() == recorded  # the recorded ML-1M table is untouched


def test_a_data_dir_that_is_not_a_data_set_is_named(tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit, match=r"--data-dir .*nothing: not a lumrec data set"):
        bench.main(["--model", "sasrec", "--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])


def test_the_budget_is_epochs_by_default_steps_or_minutes_on_request():
    """No budget given: the model's default epochs, no wall clock; --steps and --minutes map to their config keys."""
    import argparse

    bench = _bench()
    parser = argparse.ArgumentParser()
    bench.add_run_arguments(parser, "DEFAULT_EPOCHS", Path("out"), None)

    def budget(*argv: str) -> list[str]:
        args = parser.parse_args(list(argv))
        bench.check_budget(parser, args, bench.DEFAULT_EPOCHS["hstu"])
        return [o for o in bench.run_overrides(args, "hstu", Path("d")) if o.startswith("train.max") or o.startswith("train.epochs")]

    assert budget() == ["train.epochs=120", "train.max_minutes=0", "train.max_steps=0"]
    assert budget("--steps", "500") == ["train.max_steps=500", "train.max_minutes=0"]
    assert budget("--minutes", "45") == ["train.max_minutes=45.0", "train.max_steps=0"]
    with pytest.raises(SystemExit):
        budget("--steps", "5", "--epochs", "2")
    assert set(bench.DEFAULT_EPOCHS) == set(bench.RUNS)
