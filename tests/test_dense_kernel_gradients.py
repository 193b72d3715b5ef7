"""fbgemm's CPU DENSE embedding kernel (RowwiseAdamW's tables when sharded) against nn.functional.embedding_bag.

torch warns that `fbgemm::dense_embedding_codegen_lookup_function` has no kernel on the Autograd
key "and may lead to silently incorrect behavior"; the op runs its backward through an autograd
Function inside it. These tests show the gradients it warns about are exact, on random shapes.
"""

from __future__ import annotations

import logging
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen

from lumrec.library_noise import KNOWN_LIBRARY_WARNINGS, silence_known_library_noise


def _random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    tables = [(int(torch.randint(3, 40, (1,), generator=g)), 4 * int(torch.randint(1, 5, (1,), generator=g)))
              for _ in range(int(torch.randint(1, 4, (1,), generator=g)))]
    batch = int(torch.randint(1, 9, (1,), generator=g))
    # Features are table-major: table t's bags for samples 0..B-1, then table t+1's; bags may be empty.
    lengths = [torch.randint(0, 5, (batch,), generator=g) for _ in tables]
    indices = [torch.randint(0, rows, (int(l.sum()),), generator=g) for (rows, _), l in zip(tables, lengths)]
    return g, tables, batch, lengths, indices


@pytest.mark.parametrize("pooling", [PoolingMode.SUM, PoolingMode.MEAN])
@pytest.mark.parametrize("seed", range(6))
def test_dense_kernel_forward_and_gradients_match_embedding_bag(seed, pooling):
    g, tables, batch, lengths, indices = _random_case(seed)
    module = DenseTableBatchedEmbeddingBagsCodegen(tables, pooling_mode=pooling, use_cpu=True)
    with torch.no_grad():
        module.weights.copy_(torch.randn(module.weights.shape, generator=g))
    all_lengths = torch.cat(lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(all_lengths, 0)])
    out = module(torch.cat(indices), offsets)
    upstream = torch.randn(out.shape, generator=g)
    (out * upstream).sum().backward()

    mode = "sum" if pooling == PoolingMode.SUM else "mean"
    refs, grads, row = [], [], 0
    for (rows, dim), lens, idx in zip(tables, lengths, indices):
        weight = module.weights.detach()[row : row + rows * dim].view(rows, dim).clone().requires_grad_(True)
        row += rows * dim
        bag_offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lens, 0)[:-1]])
        refs.append(F.embedding_bag(idx, weight, bag_offsets, mode=mode))
        grads.append(weight)
    ref = torch.cat(refs, dim=1)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.weights.grad, torch.cat([w.grad.reshape(-1) for w in grads]), rtol=1e-5, atol=1e-6)


def test_the_autograd_warning_is_the_known_one_and_silenced():
    module = DenseTableBatchedEmbeddingBagsCodegen([(5, 4)], pooling_mode=PoolingMode.SUM, use_cpu=True)
    indices, offsets = torch.tensor([0, 3, 4]), torch.tensor([0, 2, 3])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        module(indices, offsets).sum().backward()
    texts = [str(w.message) for w in seen]
    fbgemm = next(e for e in KNOWN_LIBRARY_WARNINGS if e.source == "fbgemm")
    assert any(t.startswith("fbgemm::dense_embedding_codegen_lookup_function") for t in texts)
    assert "exact" in fbgemm.why and "test_dense_kernel_gradients" in fbgemm.why
    # The filter the lumrec command installs matches the real text (warnings match messages at their start).
    assert any(re.match(fbgemm.message, t) for t in texts)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=fbgemm.message, category=fbgemm.category)
        module(indices, offsets).sum().backward()
    assert not [w for w in seen if "dense_embedding_codegen_lookup_function" in str(w.message)]


def test_known_library_records_are_dropped_from_their_logger(caplog):
    silence_known_library_noise()
    logger = logging.getLogger("torchrec.distributed.utils")
    with caplog.at_level(logging.WARNING, logger="torchrec.distributed.utils"):
        logger.warning("Compute Kernel is dense, caching params will be ignored")
        logger.warning("Compute Kernel is fused, something else")
    assert [r.getMessage() for r in caplog.records] == ["Compute Kernel is fused, something else"]
