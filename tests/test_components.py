"""torchx components: each is torchx's dist.ddp around `python -m lumrec.cli JOB CONFIG ...` with the given layout."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest

from lumrec.config import load_config
from lumrec.pipelines.daily import DailyConfig
from lumrec.pipelines.pretrain_config import PretrainConfig
from lumrec.pipelines.query import QueryConfig
from lumrec.pipelines.rank_config import RankConfig

SPEC = importlib.util.spec_from_file_location("components", Path(__file__).resolve().parents[1] / "pipelines" / "components.py")
components = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(components)


def _command(app) -> str:
    (role,) = app.roles
    return " ".join([role.entrypoint, *role.args])


def test_daily_component_runs_the_cli_under_torchrun_with_the_layout():
    app = components.daily("full_refresh=true", ds="2026-01-08", j="1x2", config="configs/daily_synthetic.yaml")
    cmd = _command(app)
    assert "--nnodes 1" in cmd and "--nproc_per_node 2" in cmd
    assert cmd.endswith("-m lumrec.cli daily configs/daily_synthetic.yaml ds=2026-01-08 full_refresh=true")
    assert app.name == "lumrec-daily" and app.roles[0].num_replicas == 1


def test_range_and_other_jobs():
    assert _command(components.daily(start="2026-01-08", end="2026-01-10")).endswith("start=2026-01-08 end=2026-01-10")
    assert _command(components.pretrain("train.epochs=3", config="configs/ml1m_hstu.yaml")).endswith(
        "-m lumrec.cli pretrain configs/ml1m_hstu.yaml train.epochs=3")
    assert _command(components.query(as_of_ds="2026-01-08")).endswith("query configs/query_synthetic.yaml as_of_ds=2026-01-08")
    assert _command(components.rank(j="2x4")).endswith("rank configs/rank_synthetic.yaml")
    assert components.rank(j="2x4").roles[0].num_replicas == 2


@pytest.mark.parametrize("name", ["daily", "pretrain", "query", "rank"])
def test_components_have_real_type_hints_for_torchx(name):
    """torchx decodes the parameters' annotations: they must be types, not strings (no postponed annotations)."""
    params = inspect.signature(getattr(components, name)).parameters
    assert all(not isinstance(p.annotation, str) for p in params.values())


def test_default_configs_of_the_components_load():
    """The config files the components default to parse into their jobs' configs (a key typo would fail here)."""
    repo = Path(__file__).resolve().parents[1]
    daily = load_config(DailyConfig, repo / "configs/daily_synthetic.yaml", overrides=["ds=2026-01-08"])
    assert daily.pretrain.model == "lum" and daily.rank.lum is not None
    assert load_config(PretrainConfig, repo / "configs/ml1m_hstu.yaml").train.lr_decay_fraction == 0.2
    assert load_config(QueryConfig, repo / "configs/query_synthetic.yaml").users == "active"
    assert load_config(RankConfig, repo / "configs/rank_synthetic.yaml").model == "sim"
