"""A user's own CSV of (user, item, time, rating) through import, pretrain, query, rank and daily: config files only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from lumrec.data.dataset import Dataset

T0 = 1_714_521_600  # 2024-05-01 00:00:00 UTC
DAYS = [f"2024-05-0{d}" for d in range(1, 8)]


def _lumrec(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "lumrec.cli", *args], capture_output=True, text=True, timeout=600, env=env)


def _ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return run


def _events_csv(path: Path) -> Path:
    """Seven days of ratings by 40 users of 25 items (string ids, unix seconds), as a company might export them."""
    rng = np.random.default_rng(0)
    lines = ["member,sku,ts,stars"]
    for day in range(7):
        for user in range(40):
            for _ in range(int(rng.integers(1, 4))):
                t = T0 + day * 86_400 + int(rng.integers(0, 86_000))
                lines.append(f"m{user},p{int(rng.integers(0, 25))},{t},{int(rng.integers(1, 6))}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _pretrain(data: Path, out: Path) -> dict:
    # No condition columns in the CSV: the LUM learns under a constant condition (`const`).
    return {
        "model": "lum", "out": str(out),
        "data": {"path": str(data), "end": DAYS[2], "max_len": 16, "condition_features": [], "item_features": ["item_id"],
                 "train_excludes_last": 1},
        "train": {"seed": 0, "epochs": 2, "rows_per_batch": 8, "num_negatives": 8, "threads": 1, "eval_every_epochs": 10000},
        "model_config": {"d_model": 8, "num_layers": 1, "num_heads": 1, "ffn_dim": 16},
    }


def _rank(data: Path, out: Path, store: Path) -> dict:
    return {
        "data": str(data), "out": str(out), "model": "mlp",
        "samples": {"protocol": "impressions", "first_day": DAYS[3], "last_day": DAYS[5], "test_fraction": 0.3, "valid_fraction": 0.3},
        "sizes": {"embedding_dim": 4, "mlp": [8]},
        "lum": {"store": str(store), "conditions": ["const=0"], "features": ["sim", "missing"]},
        "train": {"seed": 0, "epochs": 2, "batch_size": 64, "threads": 1, "progress": False},
    }


def test_a_csv_goes_through_import_pretrain_query_rank_and_daily(tmp_path):
    data, store = tmp_path / "data", tmp_path / "knowledge"
    _ok(_lumrec("import", "table", str(_events_csv(tmp_path / "ratings.csv")), str(data), "--user-col", "member",
                "--item-col", "sku", "--time-col", "ts", "--rating-col", "stars", "--name", "shop"))
    meta = Dataset(data).read_meta()
    assert meta.name == "shop" and Dataset(data).days("impressions") == DAYS

    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(_pretrain(data, tmp_path / "lum")))
    _ok(_lumrec("pretrain", str(tmp_path / "pretrain.yaml")))

    (tmp_path / "query.yaml").write_text(yaml.safe_dump({
        "checkpoint": str(tmp_path / "lum"), "as_of_ds": DAYS[2], "users": "all", "store": str(store), "progress": False,
        "conditions": [{"feature": "const", "values": "all"}], "rows_per_batch": 4, "threads": 1,
    }))
    _ok(_lumrec("query", str(tmp_path / "query.yaml")))

    (tmp_path / "rank.yaml").write_text(yaml.safe_dump(_rank(data, tmp_path / "rank", store)))
    _ok(_lumrec("rank", str(tmp_path / "rank.yaml")))
    ranked = json.loads((tmp_path / "rank" / "results.json").read_text())
    assert 0.0 <= ranked["test"]["auc"] <= 1.0 and ranked["lum_dim"] > 0

    daily = {
        "data": str(data), "out": str(tmp_path / "daily"), "epochs_per_day": 1, "bootstrap_epochs": 1,
        "pretrain": _pretrain(data, tmp_path / "unused"),
        "query": {"conditions": [{"feature": "const", "values": "all"}], "rows_per_batch": 4, "threads": 1, "progress": False},
        "rank": {k: v for k, v in _rank(data, tmp_path / "unused", store).items() if k in ("model", "sizes", "lum", "train")},
    }
    (tmp_path / "daily.yaml").write_text(yaml.safe_dump(daily))
    run = _ok(_lumrec("daily", str(tmp_path / "daily.yaml"), f"start={DAYS[3]}", f"end={DAYS[4]}"))
    statuses = json.loads(run.stdout.strip().splitlines()[-1])
    assert [s["status"] for s in statuses] == ["complete", "complete"]
    report = (tmp_path / "daily" / "report.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in report[1:]] == DAYS[3:5]
