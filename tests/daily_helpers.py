"""The tiny daily config the daily tests share (1-thread jobs, so runs are bitwise reproducible)."""

from __future__ import annotations


def tiny_daily_config(data: str, checkpoint_every_steps: bool = False) -> dict:
    """A daily config over the synthetic logs at `data`; `checkpoint_every_steps`: save every few steps (kills land between)."""
    pretrain_train = {"seed": 0, "rows_per_batch": 8, "lr": 0.003, "num_negatives": 8, "threads": 1, "eval_every_epochs": 10000,
                      "log_every_steps": 1000, "keep_checkpoints": 1}
    rank_train = {"seed": 0, "epochs": 2, "batch_size": 64, "lr": 0.01, "max_history": 8, "threads": 1, "progress": False}
    if checkpoint_every_steps:
        pretrain_train["checkpoint_every_steps"] = 3
        rank_train["checkpoint_every_steps"] = 2
    return {
        "data": data,
        "out": "OUT",
        "epochs_per_day": 1,
        "bootstrap_epochs": 2,
        "pretrain": {
            "model": "lum",
            "data": {"max_len": 16, "condition_features": ["scenario", "query_id"], "item_features": ["item_id"]},
            "train": pretrain_train,
            "model_config": {"d_model": 8, "num_layers": 1, "num_heads": 1, "ffn_dim": 16},
        },
        "query": {"conditions": [{"feature": "scenario", "values": "all"}], "rows_per_batch": 4, "threads": 1, "progress": False},
        "rank": {
            "model": "mlp",
            "sizes": {"embedding_dim": 4, "mlp": [8], "context_keys": ["scenario"]},
            "lum": {"conditions": ["scenario=1", "scenario=2"], "features": ["sim", "missing"]},
            "train": rank_train,
        },
    }
