"""lumrec jobs: pretrain, query, rank/retrieve, daily."""
