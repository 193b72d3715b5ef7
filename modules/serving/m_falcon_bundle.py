"""HSTU served end to end: a bundle of the trained ranker's weights, scored with M-FALCON (kind ``hstu_m_falcon``).

torch.export cannot trace the HSTU ranker's jagged attention (docs/export.md), and what serving
it needs is M-FALCON anyway: the user's history encoded once, the candidates scored in
micro-batches against its cached keys and values (``lumrec.modules.ranking.m_falcon``). So
``lumrec export`` writes an HSTU run as

    model.pt       the ranker's weights (a state dict, loaded with ``weights_only``)
    serving.json   the ranker manifest (``lumrec.modules.serving.bundle``) with kind ``hstu_m_falcon``,
                   the run's ``sizes`` (to rebuild the model) and the micro-batch size
    items.npz      as a ranker bundle's
    parity.pt      a random request and the scores of one pass per candidate (``RankerServing``, eager):
                   ``load_bundle`` checks that M-FALCON gives them within 1e-5

and ``MFalconBundle`` scores a request exactly as ``ServingBundle`` does (same fields, same
validation, same LUM features), with M-FALCON in place of the AOTInductor package.

Example (the files come from ``write_m_falcon_files``; ``lumrec export`` calls it for an HSTU run)::

    bundle = load_bundle("out/hstu-bundle")       # an MFalconBundle, parity checked
    bundle.score(7, [12, 40, 3], history=[5, 9], history_ts=[100, 200], request_ts=300).scores
"""

from __future__ import annotations

import pickle
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lumrec.modules.ranking.builder import RankModelConfig, build_ranker
from lumrec.modules.ranking.m_falcon import MFalconScorer
from lumrec.modules.serving.bundle import MANIFEST, PARITY_FILE, BundleError, ServingBundle, check_parity

__all__ = ["M_FALCON_KIND", "M_FALCON_WEIGHTS", "MFalconBundle", "write_m_falcon_files"]

M_FALCON_KIND = "hstu_m_falcon"
M_FALCON_WEIGHTS = "model.pt"
DEFAULT_MICRO_BATCH = 64


def write_m_falcon_files(model: nn.Module, wrapper: nn.Module, parity_inputs: Sequence[torch.Tensor], folder: Path) -> None:
    """Write `model`'s weights and the parity example (`wrapper`: its ``RankerServing``, one pass per candidate) into `folder`."""
    torch.save(model.state_dict(), folder / M_FALCON_WEIGHTS)
    with torch.no_grad():
        expected = wrapper(*parity_inputs)
    torch.save({"inputs": list(parity_inputs), "outputs": expected}, folder / PARITY_FILE)


class MFalconBundle(ServingBundle):
    """An HSTU ranker bundle scored with M-FALCON: ``ServingBundle``'s requests, the history encoded once per request.

    `num_runners` bounds how many requests run the model at once (the others wait), as for a package.
    """

    KIND = M_FALCON_KIND

    def _load_model(self, num_runners: int) -> Any:
        m = self.manifest
        file = self.path / M_FALCON_WEIGHTS
        if not file.is_file():
            raise BundleError(f"{file}: the bundle's weights are missing (export the run again)")
        if "sizes" not in m:
            raise BundleError(f"{self.path / MANIFEST}: no `sizes` to rebuild the HSTU ranker from (export the run again)")
        model, _ = build_ranker(m["model"], RankModelConfig(**m["sizes"]), dict(m["vocab"]), int(m["dense_dim"]), self.lum_dim)
        try:
            state = torch.load(file, weights_only=True, map_location="cpu")
            model.load_state_dict(state)
        except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BundleError(f"{file}: cannot load the ranker's weights ({first}); export the run again") from None
        model.eval()
        self.model = model
        self.scorer = MFalconScorer(model, micro_batch=int(m.get("micro_batch", DEFAULT_MICRO_BATCH)))
        self._slots = threading.BoundedSemaphore(max(1, int(num_runners)))
        return self.scorer

    def _check_parity(self) -> float:
        return check_parity(lambda *inputs: self._forward(inputs), self.path / PARITY_FILE, what="M-FALCON",
                            why="its scores are not those of one pass per candidate")

    def _forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Scores [B] = sigmoid(M-FALCON logits) of a request's ``RankerServing`` inputs."""
        context, candidates, history, dense, lum, sample_ts, hist_ts = inputs
        with self._slots:
            logits = self.scorer.score(
                {key: history[i] for i, key in enumerate(self.history_keys)},
                {key: candidates[i] for i, key in enumerate(self.candidate_keys)},
                context={key: context[i:i + 1] for i, key in enumerate(self.context_vocab)},
                history_ts=hist_ts if self.timestamps else None,
                sample_ts=int(sample_ts.reshape(-1)[0]) if self.timestamps else None,
                dense=dense if self.dense_dim else None,
                lum=lum if self.lum_dim else None,
            )
        return torch.sigmoid(logits)
