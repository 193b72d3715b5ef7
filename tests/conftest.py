"""Test-wide settings: one torch thread, so tests stay fast and stable on a shared 2-core machine."""

import torch

torch.set_num_threads(1)
