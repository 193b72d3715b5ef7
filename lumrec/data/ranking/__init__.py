"""Ranking / retrieval samples, split by purpose; the public API is re-exported by `lumrec.data.ranking_samples`.

- `config`: the protocol config and split codes;
- `reading`: behaviours grouped per user (time order checked) and point-in-time history lengths;
- `split`: time splits by days or timestamp quantiles;
- `negatives`: unseen-item negative sampling;
- `protocols`: the three protocols (`build_ranking_samples`);
- `samples`: the `RankingSamples` container, its batches and the resumable loader;
- `features`: which id features a model reads (context keys, item list keys) and their vocabulary sizes;
- `item_stats`: point-in-time item statistics joined into ranking batches.
"""
