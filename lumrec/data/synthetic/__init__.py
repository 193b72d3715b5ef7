"""Synthetic industrial logs with planted structure: lumrec's embedded default data.

``generate(out, SynthConfig(...))`` writes a complete lumrec dataset (users, items, daily
impressions, behaviours and point-in-time item_stats, manifest last). The hidden model
(interests, condition match, drift) is documented in docs/synthetic.md; ``build_world`` and
``interests_on`` expose it to experiments that need the ground truth.
"""

from lumrec.data.synthetic.config import SynthConfig
from lumrec.data.synthetic.generate import DayReport, ensure_generated, generate, generated_with
from lumrec.data.synthetic.stats import item_stats_table
from lumrec.data.synthetic.world import World, build_world, interests_on

__all__ = ["SynthConfig", "DayReport", "ensure_generated", "generate", "generated_with", "World", "build_world", "interests_on", "item_stats_table"]
