"""Retrieval and pre-training models (SASRec, HSTU, LUM, two-tower), their registry, and LUM's grouped query."""
