"""Dense item statistics of a sample's own day, joined into ranking batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from lumrec.data.dataset import Dataset, day_bounds

if TYPE_CHECKING:
    from lumrec.data.ranking_samples import RankingSampleBatch

__all__ = ["ItemStatsJoin"]


class ItemStatsJoin:
    """Dense item statistics of the sample's day (the synthetic `item_stats`, computed from earlier days only)."""

    def __init__(self, data_path: str, columns: Sequence[str], num_items: int) -> None:


        data = Dataset(data_path)
        if not data.has_table("item_stats"):
            raise ValueError(f"sizes.item_stats: dataset {data_path} has no item_stats table")
        self.columns = list(columns)
        self.tables: dict[int, torch.Tensor] = {}
        for ds in data.days("item_stats"):
            table = data.read_days("item_stats", ds, ds)
            absent = [c for c in self.columns if c not in table.column_names]
            if absent:
                raise ValueError(f"sizes.item_stats: column(s) {absent} not in {data_path}/item_stats; it has {table.column_names}")
            matrix = np.zeros((num_items, len(self.columns)), np.float32)
            ids = table.column("item_id").to_numpy()
            matrix[ids] = np.stack([table.column(c).to_numpy().astype(np.float32) for c in self.columns], axis=1)
            self.tables[day_bounds(ds)[0] // 86400] = torch.from_numpy(matrix)

    @property
    def width(self) -> int:
        return len(self.columns)

    def __call__(self, batch: "RankingSampleBatch") -> "torch.Tensor":
        """[B, width]: each sample's item statistics of its own day (zeros for a day without statistics)."""

        out = torch.zeros(len(batch), self.width)
        for d in torch.unique(batch.day).tolist():
            if int(d) in self.tables:
                rows = torch.nonzero(batch.day == d).view(-1)
                out[rows] = self.tables[int(d)][batch.item_id[rows]]
        return out
