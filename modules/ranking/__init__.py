"""Ranking backbones (Embedding+MLP, DIN, SIM, HSTU ranker) and their registry: one file and one decorator each."""
