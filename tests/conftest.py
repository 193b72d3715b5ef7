"""Test-wide settings: one torch thread, so tests stay fast and stable on a shared 2-core machine."""

import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip where CUDA is absent (CI has no GPU; the GPU machine runs them)."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
