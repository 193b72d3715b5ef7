"""The ML-1M retrieval benchmark's results file: a row keeps every seed's run and averages them."""

from __future__ import annotations

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
