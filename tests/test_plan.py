"""`lumrec plan`: TorchRec's planner on the meta device for a topology, its report, and its errors."""

from __future__ import annotations

import argparse
import json

import pytest

from lumrec.config import ConfigError
from lumrec.pipelines.plan import PlanError, load_plan_config, main, plan
from lumrec.pipelines.plan_config import PlanConfig, PlanTableConfig


def tiny(**kw) -> PlanConfig:
    base = dict(world_size=2, local_world_size=2, hbm_gb=1.0, ddr_gb=0.0, batch_size=64, tables={
        "item": PlanTableConfig(rows=200_000, dim=64, features=["item", "history"], pooling_factors=[1.0, 20.0]),
        "users": PlanTableConfig(rows=50_000, dim=32),
        "tiny": PlanTableConfig(rows=10, dim=8),
    })
    base.update(kw)
    return PlanConfig(**base)


def test_tiny_topology_plan_json_has_every_table(tmp_path):
    out = tmp_path / "plan.json"
    cfg = tiny()
    report = plan(cfg)
    assert set(report["tables"]) == {"item", "users", "tiny"}
    assert report["tables"]["users"]["features"] == ["users"]  # default: one feature named like the table
    for t in report["tables"].values():
        assert t["sharding_type"] in cfg.sharding_types and t["compute_kernel"] in cfg.compute_kernels
        assert set(t["ranks"]) <= {0, 1} and t["perf_ms"]["total"] > 0
        assert sum(s["size"][0] for s in t["shards"] if s["offset"][1] == 0) == t["rows"]  # row shards cover the table
    assert len(report["ranks"]) == 2 and all(r["hbm_gb"] <= cfg.hbm_gb for r in report["ranks"])
    # Weight + per-element momentum of the item table: 200k x 64 x 4 B x 2.
    assert report["tables"]["item"]["needs_gb"] == round(200_000 * 64 * 8 / 1024**3, 3)

    cfg_file = tmp_path / "plan.yaml"
    cfg_file.write_text("world_size: 2\nlocal_world_size: 2\nhbm_gb: 1.0\nddr_gb: 0.0\nbatch_size: 64\n"
                        "tables:\n  item: {rows: 200000, dim: 64}\n  users: {rows: 50000, dim: 32}\n")
    assert main(argparse.Namespace(config=str(cfg_file), overrides=["tables.users.dim=16"], out=str(out))) == 0
    written = json.loads(out.read_text())
    assert set(written["tables"]) == {"item", "users"} and written["tables"]["users"]["dim"] == 16
    assert written["config"]["tables"]["users"]["dim"] == 16 and written["summary"]["hbm_gb_max"] > 0


def test_table_too_large_names_the_table_and_memory():
    cfg = tiny(tables={"huge": PlanTableConfig(rows=100_000_000, dim=128), "small": PlanTableConfig(rows=100, dim=8)})
    with pytest.raises(PlanError, match=r"table 'huge' needs 95\.367 GB .*100,000,000 rows x 128") as err:
        plan(cfg)
    assert "small" not in str(err.value) and "world_size" in str(err.value)


def test_tables_that_fit_alone_but_not_together_name_every_table():
    # Each fits on one rank of 1 GB (85% usable), both together do not.
    cfg = tiny(sharding_types=["table_wise"], world_size=1, local_world_size=1,
               tables={"a": PlanTableConfig(rows=4_000_000, dim=16), "b": PlanTableConfig(rows=4_000_000, dim=16)})
    with pytest.raises(PlanError, match=r"need a 0\.477 GB, b 0\.477 GB"):
        plan(cfg)


def test_built_in_default_and_overrides_without_a_file():
    cfg = load_plan_config("world_size=64", ["tables.item_id.rows=2000000000"])
    assert cfg.world_size == 64 and cfg.tables["item_id"].rows == 2_000_000_000 and "user_id" in cfg.tables
    with pytest.raises(ConfigError, match="world_sise"):
        load_plan_config(None, ["world_sise=4"])
    with pytest.raises(ConfigError, match="tables.items"):
        load_plan_config(None, ["tables.items={rows: 10, dim: 4}"])
    with pytest.raises(ConfigError, match="pooling_factors"):
        load_plan_config(None, ["tables.user_id.pooling_factors=[1.0, 2.0]"])
