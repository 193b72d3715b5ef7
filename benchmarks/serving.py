"""LUM's serving argument, measured: ranking latency with LUM knowledge from Redis stays flat as the LUM grows,
while HSTU end to end (M-FALCON) grows with its size and the history it reads.

Closed-loop load on loopback against `lumrec serve` (one server process per model, concurrency 1 to
16, every level bounded in requests and seconds), ranking 100 candidates per request:

  (a) ``dlrm``: the DLRM alone (SIM, exported with AOTInductor), no knowledge;
  (b) ``dlrm+lum``: the same DLRM trained with LUM features, the user's knowledge read from Redis,
      for LUMs of about 1M to over 100M parameters (each DLRM trained on its LUM's knowledge);
  (c) ``hstu``: HSTU ranking end to end with M-FALCON at about the same sizes, histories of 64 to
      1024 behaviours.

Then the faults, under load on the (b) server of the smallest LUM: Redis killed and restarted (with
the knowledge published again), a flood of malformed requests, a model swap (POST /admin/reload),
and a knowledge publish killed half-way (no answer may carry its version). Prints a table of
medians and percentiles, draws ``docs/results/img/serving_latency.png`` (p99 against model size
and history length), saves ``benchmarks/results/serving.json`` and ends with one JSON line.

The models are built first under ``--out`` (``benchmarks/serving_setup.py``: logs, LUMs and their
knowledge, rankers, bundles) and reused by later runs.

    .venv/bin/python benchmarks/serving.py                    # 13 minutes on the recorded 2-core machine (4 building)
    .venv/bin/python benchmarks/serving.py --tiny             # every part at toy sizes, a few minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_load import REPO, Record, ServeProcess, closed_loop, dump_json, summarize  # noqa: E402  (sibling scripts)
from serving_setup import BenchConfig, ensure_dlrm_bundles, ensure_hstu_bundles, ensure_logs, ensure_lum  # noqa: E402

import httpx  # noqa: E402

log = logging.getLogger("lumrec.bench.serving")
RESULTS = REPO / "benchmarks" / "results" / "serving.json"
PLOT = REPO / "docs" / "results" / "img" / "serving_latency.png"


# -- requests ------------------------------------------------------------------------------------


class Requests:
    """Valid requests for a bundle: a known user, `candidates` random items, context ids and a history of `history` items."""

    def __init__(self, manifest: dict[str, Any], users: list[int], candidates: int, history: int, seed: int = 0) -> None:
        self.num_items = int(manifest["num_items"])
        self.context_vocab = dict(manifest["context_vocab"])
        self.users, self.candidates, self.history = users, candidates, history
        self.seed = seed

    def __call__(self, i: int) -> dict[str, Any]:
        rng = random.Random(self.seed * 1_000_003 + i)
        now = 1_767_500_000 + i
        context = {k: rng.randrange(1, v) for k, v in self.context_vocab.items() if k != "user_id" and v > 1}
        return {
            "user_id": rng.choice(self.users),
            "candidates": [rng.randrange(1, self.num_items) for _ in range(self.candidates)],
            "context": context,
            "history": [rng.randrange(1, self.num_items) for _ in range(self.history)],
            "history_ts": list(range(now - 60 * self.history, now, 60)),
            "request_ts": now,
        }


def malformed(i: int, valid: dict[str, Any], num_items: int) -> dict[str, Any]:
    """One of several malformed versions of `valid` (what a flood of bad clients sends)."""
    bad = dict(valid)
    kind = i % 6
    if kind == 0:
        bad["candidates"] = []
    elif kind == 1:
        bad["candidates"] = ["x"] + valid["candidates"][1:]
    elif kind == 2:
        bad["candidates"] = [num_items + 7] + valid["candidates"][1:]
    elif kind == 3:
        bad["context"] = {**valid["context"], "no_such_key": 1}
    elif kind == 4:
        del bad["user_id"]
    else:
        bad["user_id"] = -3
    return bad


def knowledge_users(store: str, day: str) -> list[int]:
    """The users with stored knowledge as of `day` (requests pick from them: (b) measures knowledge that is there)."""
    from lumrec.knowledge import load_knowledge

    ids, _ = load_knowledge(store, day).user_table([])
    return [int(u) for u in ids.tolist()]


# -- measuring -------------------------------------------------------------------------------------


def load_levels(server: ServeProcess, make_body: Requests, levels: list[int], requests: int, seconds: float) -> list[dict[str, Any]]:
    """One closed-loop run per concurrency level; the summaries."""
    out = []
    for concurrency in levels:
        records, wall = closed_loop(server.url + "/rank", make_body, concurrency, requests, seconds, warmup=3,
                                    keep=("knowledge_missing",))
        stats = summarize(records, wall)
        stats["concurrency"] = concurrency
        stats["knowledge_missing"] = missing_knowledge(records)
        out.append(stats)
        log.info("  concurrency %2d: p50 %s ms, p99 %s ms, %.1f req/s, %d errors", concurrency, _ms(stats["p50_ms"]),
                 _ms(stats["p99_ms"]), stats["throughput_rps"] or 0, stats["errors"])
    return out


def missing_knowledge(records: list[Record]) -> int:
    """How many answered requests were scored without the user's knowledge."""
    return sum(bool(r.body.get("knowledge_missing")) for r in records if r.status == 200)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def phases(records: list[Record], cuts: list[float], names: list[str]) -> dict[str, dict[str, Any]]:
    """`records` split at the times `cuts` (seconds from the start) into named phases, each summarised."""
    bounds = [0.0, *cuts, float("inf")]
    out = {}
    for name, lo, hi in zip(names, bounds, bounds[1:]):
        part = [r for r in records if lo <= r.start < hi]
        span = (min(hi, max((r.start + r.seconds for r in part), default=lo)) - lo) or 1.0
        stats = summarize(part, span)
        stats["knowledge_missing"] = missing_knowledge(part)
        stats["knowledge_versions"] = sorted({r.body.get("knowledge_version") for r in part if r.status == 200} - {None})
        stats["model_versions"] = sorted({r.body.get("model_version") for r in part if r.status == 200} - {None})
        out[name] = stats
    return out


def run_in_background(fn, delay: float):
    """Call `fn` after `delay` seconds in a thread; the thread (join it) and a box with fn's result."""
    box: dict[str, Any] = {}

    def target() -> None:
        time.sleep(delay)
        box["t"] = time.perf_counter()
        box["result"] = fn()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


# -- the benchmark ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "out" / "bench" / "serving"), help="work folder (models, bundles, logs)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes and budgets: every part in a few minutes")
    parser.add_argument("--results", default=None, help=f"JSON file of the result (default {RESULTS.relative_to(REPO)}; "
                                                         "--tiny: OUT/serving.json)")
    parser.add_argument("--plot", default=None, help=f"PNG of latency (default {PLOT.relative_to(REPO)}; --tiny: OUT/serving.png)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: dlrm, lum, hstu, faults")
    args = parser.parse_args(argv)
    from lumrec.cli import setup_logging

    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would cost the client time
    cfg = BenchConfig.tiny() if args.tiny else BenchConfig()
    work = Path(args.out) / ("tiny" if args.tiny else "full")
    results = Path(args.results) if args.results else (work / "serving.json" if args.tiny else RESULTS)
    plot = Path(args.plot) if args.plot else (work / "serving.png" if args.tiny else PLOT)
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()

    # -- offline: logs, LUMs + knowledge, rankers, bundles ---------------------------------------
    data = ensure_logs(cfg, work)
    lums = [ensure_lum(cfg, size, data, work) for size in cfg.lum_sizes]
    dlrm = ensure_dlrm_bundles(cfg, data, lums, work)
    hstu = ensure_hstu_bundles(cfg, data, work) if "hstu" not in skip else {}
    build_minutes = (time.perf_counter() - t0) / 60
    log.info("built in %.1f min", build_minutes)

    from lumrec.knowledge import RedisKnowledgeConfig, local_redis_server, publish_partition

    record: dict[str, Any] = {"benchmark": "serving", "tiny": args.tiny, "machine": f"{platform.machine()}, 2 CPU cores",
                              "candidates": cfg.candidates, "budget_ms": cfg.budget_ms, "server_threads": 1,
                              "lums": lums, "dlrm": [], "dlrm_lum": [], "hstu": [], "faults": {}}
    users = knowledge_users(lums[0]["store"], cfg.lum_end)
    with local_redis_server(workdir=work / "redis") as redis:
        for lum in lums:
            publish_partition(lum["store"], cfg.lum_end, RedisKnowledgeConfig(url=redis.url, prefix=lum["name"]))

        # (a) the DLRM alone
        if "dlrm" not in skip:
            log.info("(a) DLRM alone")
            with ServeProcess(work / "bundles" / "dlrm", log_path=work / "serve-dlrm.log") as server:
                server.wait_ready()
                body = Requests(dlrm["dlrm"], users, cfg.candidates, cfg.dlrm_history)
                record["dlrm"] = load_levels(server, body, cfg.concurrency, cfg.requests, cfg.seconds)

        # (b) DLRM + LUM knowledge from Redis, per LUM size
        if "lum" not in skip:
            for lum in lums:
                log.info("(b) DLRM + knowledge of %s (%.1fM parameters)", lum["name"], lum["parameters"] / 1e6)
                with ServeProcess(work / "bundles" / lum["name"], redis.url, lum["name"], log_path=work / f"serve-{lum['name']}.log") as server:
                    server.wait_ready()
                    body = Requests(dlrm[lum["name"]], users, cfg.candidates, cfg.dlrm_history)
                    levels = load_levels(server, body, cfg.concurrency, cfg.requests, cfg.seconds)
                record["dlrm_lum"].append({"lum": lum["name"], "lum_parameters": lum["parameters"], "levels": levels})

        # (c) HSTU end to end with M-FALCON, per size and history length
        for name, manifest in hstu.items():
            for history in cfg.histories:
                log.info("(c) %s (%.1fM parameters), history %d", name, manifest["parameters"] / 1e6, history)
                with ServeProcess(work / "bundles" / name, log_path=work / f"serve-{name}.log") as server:
                    server.wait_ready()
                    body = Requests(manifest, users, cfg.candidates, history)
                    levels = load_levels(server, body, cfg.hstu_concurrency, cfg.hstu_requests, cfg.hstu_seconds)
                record["hstu"].append({"model": name, "parameters": manifest["parameters"], "history": history, "levels": levels})

        if "faults" not in skip:
            record["faults"] = run_faults(cfg, work, lums[0], dlrm, users, redis)

    record["build_minutes"] = round(build_minutes, 1)
    record["wall_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    record["headline"] = headline(record, cfg)
    print_tables(record, cfg)
    draw(record, cfg, plot)
    dump_json(results, record)
    print(json.dumps(record["headline"], separators=(",", ":")))
    return 0


def run_faults(cfg: BenchConfig, work: Path, lum: dict[str, Any], dlrm: dict[str, Any], users: list[int], redis) -> dict[str, Any]:
    """The four fault runs on the (b) server of `lum`, each under closed-loop load."""
    from lumrec.knowledge import RedisKnowledgeConfig, publish_partition, published_versions

    name, faults = lum["name"], {}
    redis_cfg = RedisKnowledgeConfig(url=redis.url, prefix=name)
    keep = ("knowledge_missing", "knowledge_version", "model_version")
    body = Requests(dlrm[name], users, cfg.candidates, cfg.dlrm_history, seed=7)
    third = cfg.fault_seconds / 3
    with ServeProcess(work / "bundles" / name, redis.url, name, extra=["--refresh-seconds", "0.5"],
                      log_path=work / "serve-faults.log") as server:
        server.wait_ready()
        url = server.url + "/rank"

        # 1. Redis killed a third into the run, restarted (empty: no persistence) and republished two thirds in.
        log.info("fault: Redis killed under load")
        readiness: list[tuple[float, int]] = []

        def probe_ready() -> None:
            end = time.perf_counter() + cfg.fault_seconds
            while time.perf_counter() < end:
                try:
                    readiness.append((time.perf_counter(), httpx.get(server.url + "/readyz", timeout=2).status_code))
                except httpx.HTTPError:
                    readiness.append((time.perf_counter(), 0))
                time.sleep(0.25)

        prober = threading.Thread(target=probe_ready, daemon=True)
        start = time.perf_counter()
        prober.start()
        killer, _ = run_in_background(redis.kill, third)

        def restart() -> str:
            redis.start()
            return publish_partition(lum["store"], cfg.lum_end, redis_cfg)

        restarter, restarted = run_in_background(restart, 2 * third)
        records, wall = closed_loop(url, body, cfg.fault_concurrency, 10**6, cfg.fault_seconds, keep=keep)
        killer.join(), restarter.join(), prober.join()
        faults["redis_killed"] = {
            "killed_at_s": round(third, 2), "restarted_at_s": round(2 * third, 2),
            "phases": phases(records, [third, 2 * third], ["before", "redis_down", "after_restart"]),
            "readyz": [(round(t - start, 2), code) for t, code in readiness],
        }

        # 2. A flood of malformed requests (every other request), valid ones measured beside them.
        log.info("fault: malformed flood")
        flood = lambda i: malformed(i, body(i), int(dlrm[name]["num_items"])) if i % 2 else body(i)  # noqa: E731
        records, wall = closed_loop(url, flood, 2 * cfg.fault_concurrency, 10**6, cfg.fault_seconds, keep=keep)
        faults["malformed_flood"] = {"all": summarize(records, wall),
                                     "status_counts": {str(s): sum(r.status == s for r in records) for s in sorted({r.status for r in records})}}

        # 3. The day's model swapped in under load.
        log.info("fault: model swap under load")
        swap_to = str(work / "bundles" / f"{name}-next")
        swapper, swapped = run_in_background(
            lambda: httpx.post(server.url + "/admin/reload", json={"bundle": swap_to}, timeout=120).status_code, third)
        records, wall = closed_loop(url, body, cfg.fault_concurrency, 10**6, cfg.fault_seconds, keep=keep)
        swapper.join()
        faults["model_swap"] = {"reload_status": swapped.get("result"),
                                "phases": phases(records, [third], ["before", "after_reload_request"])}

        # 4. A knowledge publish killed half-way (the next day's partition), then published whole.
        log.info("fault: knowledge publish killed half-way")
        before = published_versions(redis_cfg)["current"]

        def killed_publish() -> int:
            code = ("from lumrec.knowledge import RedisKnowledgeConfig, publish_partition; "
                    f"publish_partition({lum['store']!r}, {cfg.next_day!r}, RedisKnowledgeConfig(url={redis.url!r}, prefix={name!r}, "
                    "batch_size=20))")
            env = {**os.environ, "LUMREC_FAILPOINTS": "redis.users_written@2"}
            return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True).returncode

        publisher, published = run_in_background(killed_publish, third)
        records, wall = closed_loop(url, body, cfg.fault_concurrency, 10**6, cfg.fault_seconds, keep=keep)
        publisher.join()
        partial = published_versions(redis_cfg)
        served = phases(records, [], ["all"])["all"]
        faults["publish_killed"] = {"publisher_exit": published.get("result"), "version_before": before,
                                    "current_after": partial["current"], "served_versions": served["knowledge_versions"],
                                    "served_only_whole_versions": set(served["knowledge_versions"]) <= {before},
                                    "all": served}
        new = publish_partition(lum["store"], cfg.next_day, redis_cfg)
        time.sleep(1.5)  # the server polls the pointer every 0.5 s
        answer = httpx.post(url, json=body(10**6), timeout=30).json()
        faults["publish_killed"].update(republished=new, served_after_republish=answer.get("knowledge_version"))
    return faults


def _p99_at(levels: list[dict[str, Any]], concurrency: int) -> float | None:
    return next((x["p99_ms"] for x in levels if x["concurrency"] == concurrency), None)


def headline(record: dict[str, Any], cfg: BenchConfig) -> dict[str, Any]:
    """The key figures: p99 at concurrency 1 of each setting, and the largest HSTU within the budget."""
    out: dict[str, Any] = {"benchmark": "serving", "candidates": cfg.candidates}
    if record["dlrm"]:
        out["dlrm_p99_ms"] = round(_p99_at(record["dlrm"], 1) or 0, 2)
    out["dlrm_lum_p99_ms"] = {r["lum"]: round(_p99_at(r["levels"], 1) or 0, 2) for r in record["dlrm_lum"]}
    out["hstu_p99_ms"] = {f"{r['model']}@{r['history']}": round(_p99_at(r["levels"], 1) or 0, 1) for r in record["hstu"]}
    fits = [r for r in record["hstu"] if (_p99_at(r["levels"], 1) or 1e9) <= cfg.budget_ms]
    best = max(fits, key=lambda r: (r["parameters"], r["history"]), default=None)
    out["hstu_largest_within_budget"] = None if best is None else f"{best['model']} ({best['parameters'] / 1e6:.1f}M) at history {best['history']}"
    faults = record.get("faults") or {}
    if faults:
        out["faults"] = {
            "redis_killed_errors": sum(p["errors"] for p in faults["redis_killed"]["phases"].values()),
            "malformed_5xx": sum(n for s, n in faults["malformed_flood"]["status_counts"].items() if s == "0" or int(s) >= 500),
            "model_swap_errors": sum(p["errors"] for p in faults["model_swap"]["phases"].values()),
            "publish_killed_served_only_whole_versions": faults["publish_killed"]["served_only_whole_versions"],
        }
    return out


def print_tables(record: dict[str, Any], cfg: BenchConfig) -> None:
    """Rows: setting x concurrency; p50, p99, throughput, errors."""
    head = f"{'setting':<34} {'params':>8} {'conc':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'errors':>6} {'<=' + str(int(cfg.budget_ms)) + 'ms':>6}"
    print(head)
    print("-" * len(head))

    def rows(label: str, params: float | None, levels: list[dict[str, Any]]) -> None:
        for x in levels:
            ok = "yes" if (x["p99_ms"] or 1e9) <= cfg.budget_ms else "no"
            print(f"{label:<34} {'' if params is None else f'{params / 1e6:.1f}M':>8} {x['concurrency']:>5} {_ms(x['p50_ms']):>8} "
                  f"{_ms(x['p99_ms']):>8} {x['throughput_rps'] or 0:>7.1f} {x['errors']:>6} {ok:>6}")

    rows("(a) DLRM alone", None, record["dlrm"])
    for r in record["dlrm_lum"]:
        rows(f"(b) DLRM + LUM knowledge ({r['lum']})", r["lum_parameters"], r["levels"])
    for r in record["hstu"]:
        rows(f"(c) HSTU M-FALCON, history {r['history']}", r["parameters"], r["levels"])
    print(f"({cfg.candidates} candidates per request; closed loop on loopback; one server process, 1 torch thread)")


def draw(record: dict[str, Any], cfg: BenchConfig, path: Path) -> None:
    """p99 at concurrency 1 against model size: DLRM + LUM (by LUM size) and HSTU per history length; the budget line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if record["dlrm_lum"]:
        xs = [r["lum_parameters"] / 1e6 for r in record["dlrm_lum"]]
        ax.plot(xs, [_p99_at(r["levels"], 1) for r in record["dlrm_lum"]], "o-", label="DLRM + LUM knowledge (Redis), by LUM size")
    for history in cfg.histories:
        runs = [r for r in record["hstu"] if r["history"] == history]
        if runs:
            ax.plot([r["parameters"] / 1e6 for r in runs], [_p99_at(r["levels"], 1) for r in runs], "s--",
                    label=f"HSTU end to end (M-FALCON), history {history}")
    ax.axhline(cfg.budget_ms, color="grey", linestyle=":", label=f"{cfg.budget_ms:.0f} ms budget")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model parameters (millions)")
    ax.set_ylabel(f"p99 latency, {cfg.candidates} candidates (ms)")
    ax.set_title("Ranking latency against model size (concurrency 1, 2-core CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
