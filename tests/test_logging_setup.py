"""What `lumrec` jobs print: their own INFO lines, torchrec's warnings, not torchrec's INFO internals."""

from __future__ import annotations

import logging
import warnings

import pytest

from lumrec import library_noise
from lumrec.cli import setup_logging
from lumrec.library_noise import KNOWN_LIBRARY_WARNINGS


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, levels = list(root.handlers), {name: logging.getLogger(name).level for name in ("", "torchrec")}
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("verbose", [False, True])
def test_torchrec_info_is_shown_only_when_verbose(restore_logging, verbose):
    setup_logging(verbose=verbose)
    planner_stats, lookups = logging.getLogger("torchrec.distributed.planner.stats"), logging.getLogger("torchrec.distributed.embeddingbag")
    assert planner_stats.isEnabledFor(logging.INFO) == verbose and lookups.isEnabledFor(logging.INFO) == verbose
    assert lookups.isEnabledFor(logging.WARNING)  # torchrec's warnings still reach the user
    assert logging.getLogger("lumrec.distributed").isEnabledFor(logging.INFO)  # lumrec's plan lines


def test_deprecated_collectives_of_torchrec_are_known_and_silenced(monkeypatch):
    monkeypatch.setattr(library_noise, "_installed", False)  # pytest drops each test's warning filters
    library_noise.silence_known_library_noise()
    entry = next(e for e in KNOWN_LIBRARY_WARNINGS if "all_gather_into_tensor" in e.message)
    assert entry.category is FutureWarning and entry.why
    with warnings.catch_warnings(record=True) as seen:
        warnings.filterwarnings("always", append=True)  # after the known ones: they still match first
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
            warnings.warn(f"`torch.distributed.{name}` is deprecated. Please use ...", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
