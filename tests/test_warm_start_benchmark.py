"""benchmarks/warm_start.py on any data set and set-up file: named set-ups load from YAML, and a set-up whose
conditions, columns or days the data lacks stops the run before anything trains, naming the file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from benchmark_scripts import load_benchmark

from lumrec.data.synthetic import SynthConfig, ensure_generated


def _bench():
    return load_benchmark("warm_start")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    bench = _bench()
    setup = bench.load_setup(bench.CONFIGS / "synthetic.yaml", tiny=True)
    data = tmp_path_factory.mktemp("ws") / "logs"
    ensure_generated(data, SynthConfig(**setup.source.synth))
    return data


def _config(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((_bench().CONFIGS / "synthetic.yaml").read_text())
    raw = _bench().deep_merge(raw, raw.pop("tiny"))
    raw.update(changes)
    path = tmp_path / "elsewhere" / "my_setup.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_named_set_ups_load_and_their_tiny_overrides_apply(tmp_path):
    bench = _bench()
    full, tiny = bench.load_setup(bench.CONFIGS / "synthetic.yaml"), bench.load_setup(bench.CONFIGS / "synthetic.yaml", tiny=True)
    assert (full.daily, tiny.daily) == (("2026-01-07", "2026-01-10"), ("2026-01-04", "2026-01-06"))
    assert (full.d_model, tiny.d_model, tiny.condition_features) == (32, 16, ["scenario", "query_id"])
    ml1m = bench.load_setup(bench.CONFIGS / "ml1m_ratings.yaml")
    assert ml1m.source.kind == "ml-1m-ratings" and ml1m.lum["candidate_condition_feature"] == "category_id"
    with pytest.raises(Exception, match="colour"):  # an unknown key is an error naming it
        bench.load_setup(_config(tmp_path, colour=1))


@pytest.mark.parametrize("changes, named", [
    ({"condition_features": ["scenario", "brand_id"]}, r"my_setup.yaml: condition_features: feature 'brand_id' is not in data set"),
    ({"lum": {"conditions": ["scenario=9"], "candidate_condition_feature": "query_id", "features": ["sim"]}},
     r"lum.conditions\[0\]: condition 'scenario=9': data set .* has scenario ids 1..2"),
    ({"item_stats": ["f_ctr_7d", "f_nope"]}, r"item_stats: column\(s\) \['f_nope'\] are not in data set"),
    ({"context_keys": ["scenario", "device"]}, r"context_keys: 'device' has no vocabulary"),
    ({"daily": ["2026-01-04", "2026-01-30"]}, r"daily: days 2026-01-04..2026-01-30 are not inside data set"),
])
def test_a_set_up_the_data_does_not_match_stops_before_anything_trains(tmp_path, tiny_data, changes, named):
    bench = _bench()
    config = _config(tmp_path, **changes)
    out = tmp_path / "out"
    with pytest.raises(bench.ConfigMismatch, match=named):
        bench.main(["--data-dir", str(tiny_data), "--config", str(config), "--out", str(out), "--row", "dlrm-scratch"])
    assert not any(out.rglob("checkpoints"))  # nothing trained


def test_a_data_dir_with_a_set_up_anywhere_runs_and_writes_outside_the_repository(tmp_path, tiny_data):
    bench = _bench()
    recorded = bench.RESULTS.read_bytes()
    config = _config(tmp_path)
    out = tmp_path / "out"
    assert bench.main(["--data-dir", str(tiny_data), "--config", str(config), "--out", str(out), "--row", "dlrm-scratch",
                       "--threads", "1"]) == 0
    rows = json.loads((out / "results" / "warm_start.json").read_text())
    record = rows["logs+my_setup"]
    assert record["data_dir"] == str(tiny_data) and record["config"] == str(config)
    assert record["budget"] == {"bootstrap_epochs": 3, "epochs_per_day": 1, "rank_epochs": 1}
    assert len(record["rows"]["dlrm-scratch"]["next_day_auc"]) == 3
    assert bench.RESULTS.read_bytes() == recorded  # the recorded tables are untouched
    assert not (out / "logs+my_setup" / "data").exists()  # --data-dir is read as it is
