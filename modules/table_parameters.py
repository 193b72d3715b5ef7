"""Which parameters are embedding tables (row-wise optimizer) and which are dense (AdamW).

    >>> import torch
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    >>> ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])])
    >>> model = torch.nn.ModuleDict({"tables": ebc, "mlp": torch.nn.Linear(4, 1)})
    >>> tables, dense = split_parameters(model)
    >>> [tuple(p.shape) for p in tables], [tuple(p.shape) for p in dense]
    ([(10, 4)], [(1, 4), (1,)])
"""

from __future__ import annotations

import torch
from torchrec import EmbeddingBagCollection, EmbeddingCollection

__all__ = ["named_table_parameters", "split_parameters"]


def named_table_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every trainable parameter of `module`'s EmbeddingBagCollections and EmbeddingCollections."""
    found, seen = [], set()
    for prefix, sub in module.named_modules():
        if isinstance(sub, (EmbeddingBagCollection, EmbeddingCollection)):
            for name, p in sub.named_parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    found.append((f"{prefix}.{name}" if prefix else name, p))
    return found


def split_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(embedding-table parameters, dense parameters): tables get the rowwise optimizer."""
    tables = [p for _, p in named_table_parameters(model)]
    table_ids = {id(p) for p in tables}
    dense = [p for p in model.parameters() if id(p) not in table_ids and p.requires_grad]
    return tables, dense
