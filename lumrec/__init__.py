"""lumrec: TorchRec-based LUM and HSTU generative recommenders."""
