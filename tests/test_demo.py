"""`lumrec demo`: all three LUM steps on tiny synthetic logs, ending with the Base vs Base+LUM table and a JSON line."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from lumrec.data.synthetic import SynthConfig, generate
from lumrec.errors import EXIT_USER
from lumrec.knowledge import knowledge_days
from lumrec.pipelines.demo import DEMO_MARKER, DEMO_SYNTH, DemoConfig, DemoFolderError, claim_demo_folder, main, run_demo

TINY_SYNTH = SynthConfig(seed=0, num_users=80, num_items=50, num_categories=4, num_queries=8, num_days=6, impressions_per_user_day=10)


def tiny_demo(out) -> DemoConfig:
    return DemoConfig(out=str(out), max_len=64, pretrain_days=2, pretrain_steps=4, lum_max_len=32, lum_d_model=8,
                      lum_rows_per_batch=8, rank_epochs=1, rank_batch_size=128, threads=1,
                      pretrain_log_every_steps=2)


def test_demo_runs_three_steps_and_ends_with_table_and_json(tmp_path, capsys):
    figures = run_demo(tiny_demo(tmp_path / "demo"), TINY_SYNTH)
    lines = capsys.readouterr().out.strip().splitlines()
    # The last line is the JSON of the returned figures.
    assert json.loads(lines[-1]) == json.loads(json.dumps(figures))
    start = next(i for i, line in enumerate(lines) if line.startswith("row "))
    table = lines[start : start + 4]
    assert table[0].split()[:3] == ["row", "test", "AUC"] and set(table[1]) == {"-"}
    base, lum = table[2], table[3]
    assert base.startswith("Base (SIM)") and lum.startswith("Base+LUM (SIM + LUM features)")
    assert base.split()[-4:] == [f"{figures['base_auc']:.4f}", f"{figures['base_ne']:.4f}", "-", "1"]
    assert lum.split()[-4:] == [f"{figures['lum_auc']:.4f}", f"{figures['lum_ne']:.4f}", f"{figures['delta_auc']:+.4f}", "1"]
    assert abs(figures["lum_auc"] - figures["base_auc"] - figures["delta_auc"]) < 2e-4
    text = "\n".join(lines)
    for step in ("synthetic logs:", "LUM tokens:", "packed batch:", "step 1: LUM", "step 2: knowledge store", "step 3: SIM ranker",
                 "step 4: daily pipeline"):
        assert step in text
    # Step 4: three daily runs (days 3-5), each evaluated on the next day; the table is the last thing before the JSON.
    daily = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[-6:-1]]
    assert daily[0][:2] == ["day", "LUM steps"] and set("".join(daily[1])) <= {"-", ":", " "}
    assert [row[0] for row in daily[2:]] == ["2026-01-03", "2026-01-04", "2026-01-05"]
    assert figures["daily_status"] == ["complete"] * 3 and all(0.0 < auc < 1.0 for auc in figures["daily_next_day_auc"])
    assert [row[daily[0].index("next-day AUC")] for row in daily[2:]] == [f"{a:.4f}" for a in figures["daily_next_day_auc"]]
    warm = daily[0].index("DLRM warm start")
    # Day 3 from step 3's Base, later days from the day before.
    assert [row[warm] for row in daily[2:]] == ["from step 3's Base", "from 01-03", "from 01-04"]
    # Knowledge as of the LUM's last training day up to the day before the last sample day.
    assert knowledge_days(tmp_path / "demo" / "knowledge") == ["2026-01-02", "2026-01-03", "2026-01-04"] == figures["knowledge_days"]
    assert figures["lum_steps"] == 4 and figures["conditions"] == 2 + 8  # scenarios 1-2 and queries 1-8
    # LUM features widen the ranker's input: 3 similarities + 4 missing flags (3 conditions, the item).
    assert figures["rank_input_width"]["lum"] - figures["rank_input_width"]["base"] == 7
    assert 0.0 < figures["base_auc"] < 1.0 and 0.0 < figures["lum_auc"] < 1.0
    # Every job of the demo leaves TensorBoard event files in its run folder.
    for job in ("lum", "knowledge", "rank/base", "rank/lum", "daily"):
        assert list((tmp_path / "demo" / job / "tb").glob("events.out.tfevents.*")), f"no TensorBoard events for {job}"
    assert (tmp_path / "demo" / DEMO_MARKER).is_file()  # the demo's own folder: a rerun replaces its steps' folders


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path):
    """The demo deletes lum/, knowledge/, rank/ and daily/ of its folder: a folder holding anything else is refused, untouched."""
    folder = tmp_path / "mine"
    (folder / "rank").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep")
    with pytest.raises(DemoFolderError) as err:
        run_demo(tiny_demo(folder), TINY_SYNTH)
    assert str(err.value) == (f"demo: --out {folder} is not a demo folder: it holds notes.txt and no {DEMO_MARKER} marker. The demo "
                              "deletes and rewrites lum, knowledge, rank, daily in its folder: pass --out with a new or empty folder, "
                              f"or remove {folder}")
    assert err.value.exit_code == EXIT_USER
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "rank"]
    # Only the demo's names, but data/ is not lumrec's synthetic logs: refused too.
    (folder / "notes.txt").unlink()
    with pytest.raises(DemoFolderError, match="it holds rank \\(its data/ is not lumrec's synthetic logs\\)"):
        claim_demo_folder(folder)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DemoFolderError, match="is a file"):
        claim_demo_folder(tmp_path / "file.txt")


def test_demo_claims_new_empty_and_its_own_folders(tmp_path):
    for folder in (tmp_path / "new" / "demo", tmp_path / "empty"):
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.name == "empty":
            folder.mkdir()
        claim_demo_folder(folder)
        assert (folder / DEMO_MARKER).is_file()
        claim_demo_folder(folder)  # marked: the demo's
    # A demo run's folder without the marker: only the demo's folders, lumrec's synthetic logs in data/.
    old = tmp_path / "old"
    generate(old / "data", TINY_SYNTH, progress=False)
    (old / "rank" / "base").mkdir(parents=True)
    claim_demo_folder(old)
    assert (old / DEMO_MARKER).is_file() and (old / "rank" / "base").is_dir()


def test_demo_rejects_too_few_days(tmp_path):
    cfg = tiny_demo(tmp_path / "demo")
    cfg.pretrain_days = 3
    with pytest.raises(ValueError, match="pretrain_days must leave 4 days for steps 3-4: 6 days, pretrain_days=3"):
        run_demo(cfg, TINY_SYNTH)


def test_cli_entry_reads_synthetic_overrides(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("lumrec.pipelines.demo.run_demo", lambda cfg, synth: seen.update(cfg=cfg, synth=synth))
    args = argparse.Namespace(out=str(tmp_path), max_len=128, num_users=50, pretrain_minutes=0.5, threads=1)
    assert main(args) == 0
    assert seen["synth"].num_users == 50 and seen["synth"].num_days == 11 and seen["cfg"].max_len == 128
    assert seen["cfg"].pretrain_minutes == 0.5 and seen["cfg"].threads == 1


def _without_timings(text: str) -> str:
    """Demo output with its wall-clock figures masked (the README's block is from one machine)."""
    return re.sub(r"\b\d+ s\b", "<t> s", text)


# Metrics are float32 training results: CPUs with other vector units (AVX2, AVX-512, AVX-512 FP16)
# sum in other orders, and after 2 epochs and 3 daily days the printed AUC / NE move by up to
# about 0.002 between x86 machines. Counts, names and every other token must match exactly.
METRIC_TOLERANCE = 0.004
_DECIMAL = re.compile(r"[+-]?\d+\.\d+")


def assert_same_demo_output(printed: str, block: str, tolerance: float = METRIC_TOLERANCE) -> None:
    """`printed` equals `block` apart from timings, with decimal figures equal within `tolerance`."""
    printed, block = _without_timings(printed), _without_timings(block)
    assert _DECIMAL.sub("<x>", printed) == _DECIMAL.sub("<x>", block)
    for line_printed, line_block in zip(printed.splitlines(), block.splitlines()):
        for got, want in zip(_DECIMAL.findall(line_printed), _DECIMAL.findall(line_block)):
            assert abs(float(got) - float(want)) <= tolerance, f"{got} where the README shows {want}: {line_printed!r}"


def test_demo_output_comparison_tolerates_only_metric_noise():
    block = "step 1: 330 steps in 9 s, HR@10 0.598\n| 2026-01-08 | 38 | 0.7233 | +0.0075 |"
    assert_same_demo_output("step 1: 330 steps in 12 s, HR@10 0.599\n| 2026-01-08 | 38 | 0.7250 | +0.0076 |", block)
    for changed in ("step 1: 331 steps in 9 s, HR@10 0.598\n| 2026-01-08 | 38 | 0.7233 | +0.0075 |",
                    "step 1: 330 steps in 9 s, HR@10 0.598\n| 2026-01-08 | 38 | 0.7333 | +0.0075 |",
                    "step 1: 330 steps in 9 s, HR@10 0.598\n| 2026-01-09 | 38 | 0.7233 | +0.0075 |"):
        with pytest.raises(AssertionError):
            assert_same_demo_output(changed, block)


def test_readme_shows_what_the_default_demo_prints(tmp_path, capsys):
    """The README's demo block equals the default demo's output (steps 1-4 and both tables) apart from timings and metric noise."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- demo-output:start -->\n```\n", 1)[1].split("\n```\n<!-- demo-output:end -->", 1)[0]
    out = tmp_path / "demo"
    run_demo(DemoConfig(out=str(out)), SynthConfig(**DEMO_SYNTH))
    lines = capsys.readouterr().out.replace(str(out), "out/demo").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("step 1:"))
    printed = "\n".join(lines[start:-1])  # the last line is the JSON of key figures
    assert_same_demo_output(printed, block)
