"""`lumrec plot`: PNGs drawn from result files, opened and checked as images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumrec.cli import main as cli_main
from lumrec.errors import EXIT_USER
from lumrec.plots import bars_from_lum_tables, curves_from_run, daily_auc, plot_paths
from lumrec.tracking import ScalarLog


def _open_png(path: Path) -> np.ndarray:
    """The image's pixels; fails unless the file is a real PNG with drawn content."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    with Image.open(path) as img:
        img.load()
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    # Something was drawn: far from a blank canvas (several distinct colours).
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10
    return pixels


def _run_folder(root: Path, with_tb: bool) -> Path:
    run = root / "rank-run"
    run.mkdir()
    history = [{"epoch": e, "step": 10 * (e + 1), "train_loss": 0.6 - 0.05 * e, "valid": {"auc": 0.70 + 0.01 * e}, "test": None}
               for e in range(4)]
    (run / "results.json").write_text(json.dumps({"history": history}))
    if with_tb:
        scalars = ScalarLog(run)
        for step in range(1, 41):
            scalars.scalar("train/loss", 0.7 - 0.005 * step, step)
        scalars.close()
    return run


def _daily_folder(root: Path, name: str, aucs: list[float]) -> Path:
    folder = root / name
    folder.mkdir()
    lines = ["ds\tlum_steps\tnext_day_auc\tne"]
    lines += [f"2026-01-0{8 + i}\t40\t{auc:.4f}\t0.9" for i, auc in enumerate(aucs)]
    (folder / "report.tsv").write_text("\n".join(lines) + "\n")
    return folder


def _lum_tables(root: Path) -> Path:
    path = root / "lum_tables.json"
    row = lambda mean, std: {"auc_mean": mean, "auc_std": std}  # noqa: E731
    path.write_text(json.dumps({
        "synthetic/sim": {"dataset": "synthetic", "labels": {"base": "Base", "lum": "Base+LUM (x)"},
                          "rows": {"base": row(0.74, 0.002), "lum": row(0.75, 0.001)}},
        "ml1m-ratings/sim": {"dataset": "ml1m-ratings", "rows": {"base": row(0.747, 0.001), "lum": row(0.753, 0.001)}},
        "synthetic-tiny/sim": {"dataset": "synthetic", "rows": {"base": row(0.4, 0.1), "lum": row(0.5, 0.1)}},
    }))
    return path


def test_training_curves_read_tensorboard_scalars_then_history(tmp_path):
    run = _run_folder(tmp_path, with_tb=True)
    loss, metric = curves_from_run(run)
    assert loss.x == [float(s) for s in range(1, 41)] and loss.y[0] == pytest.approx(0.695)
    assert metric.label == "valid auc" and metric.y == pytest.approx([0.70, 0.71, 0.72, 0.73])
    (png,) = plot_paths([run], tmp_path / "png")
    assert png.name == "rank-run_curves.png"
    _open_png(png)


def test_training_curves_fall_back_to_epoch_history_without_tb(tmp_path):
    run = _run_folder(tmp_path, with_tb=False)
    loss, _ = curves_from_run(run)
    assert loss.label == "train loss (epoch mean)" and loss.x == [10.0, 20.0, 30.0, 40.0]


def test_daily_auc_line_and_base_vs_lum_bars_through_the_cli(tmp_path, capsys):
    a = _daily_folder(tmp_path, "daily-lum", [0.72, 0.75, 0.74])
    b = _daily_folder(tmp_path, "daily-base", [0.71, 0.73, 0.72])
    tables = _lum_tables(tmp_path)
    assert [c.y for c in daily_auc([a, b])] == [[0.72, 0.75, 0.74], [0.71, 0.73, 0.72]]
    groups = bars_from_lum_tables(tables)
    assert [g.name for g in groups] == ["ml1m-ratings", "synthetic"]  # tiny smoke rows are not results
    assert groups[1].bars == {"Base": (0.74, 0.002), "Base+LUM": (0.75, 0.001)}
    assert cli_main(["plot", str(a), str(b), str(tables), "--out", str(tmp_path / "png")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == ["base_vs_lum.png", "daily_auc.png"]
    for p in printed:
        _open_png(Path(p))
    assert not list((tmp_path / "png").glob(".*.tmp"))  # written through a temporary name, none left


def test_plot_errors_name_the_input(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["plot", str(empty), "--out", str(tmp_path / "png")]) == EXIT_USER
    assert str(empty) in capsys.readouterr().err
    assert cli_main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "png")]) == EXIT_USER
    bad = _daily_folder(tmp_path, "bad", [0.7])
    (bad / "report.tsv").write_text("ds\tauc\n2026-01-08\t0.7\n")
    with pytest.raises(ValueError, match="report.tsv: no next_day_auc column"):
        plot_paths([bad], tmp_path / "png")


def test_bars_pick_data_sets_in_order_and_the_lum_row_chosen_on_validation(tmp_path):
    tables = _lum_tables(tmp_path)
    data = json.loads(tables.read_text())
    data["beauty/sim"] = {"rows": {"base": {"auc_mean": 0.757, "auc_std": 0.001}, "lum": {"auc_mean": 0.751, "auc_std": 0.002},
                                   "no-condition": {"auc_mean": 0.769, "auc_std": 0.003}},
                          "selected_on_validation": {"row": "no-condition", "auc_mean": 0.769, "auc_std": 0.003}}
    tables.write_text(json.dumps(data))
    groups = bars_from_lum_tables(tables, ["synthetic", "beauty"])
    assert [g.name for g in groups] == ["synthetic", "beauty"]
    assert groups[1].bars["Base+LUM"] == (0.769, 0.003)  # validation picked the LUM row, not the test set
    with pytest.raises(ValueError, match=r"no data set \['amazon'\]"):
        bars_from_lum_tables(tables, ["amazon"])
    assert cli_main(["plot", str(tables), "--datasets", "beauty,synthetic", "--out", str(tmp_path / "png")]) == 0
    _open_png(tmp_path / "png" / "base_vs_lum.png")


def test_warm_start_results_draw_one_line_per_row(tmp_path):
    path = tmp_path / "warm_start.json"
    days = ["2026-01-05", "2026-01-06", "2026-01-07"]
    path.write_text(json.dumps({"synthetic": {"rows": {
        "dlrm-scratch": {"label": "DLRM(scratch)", "eval_days": days, "next_day_auc": [0.70, 0.71, 0.72]},
        "lum-param": {"label": "LUM(param)", "eval_days": days, "next_day_auc": [0.73, 0.74, 0.745]},
    }}}))
    (png,) = plot_paths([path], tmp_path / "png")
    assert png.name == "warm_start_synthetic.png"
    _open_png(png)
    with pytest.raises(ValueError, match=r"no data set \['ml1m'\]"):
        plot_paths([path], tmp_path / "png", datasets=["ml1m"])
