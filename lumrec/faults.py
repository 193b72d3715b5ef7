"""Failpoints: kill the process (SIGKILL, as `kill -9` does) at a named point, to test exactly-once resume.

    LUMREC_FAILPOINTS="checkpoint.saved@3,daily.query.committed" lumrec daily ...

kills the job at the third checkpoint save, or when the query stage has committed its
knowledge partition but not yet its stage manifest, whichever comes first. Unset, a
failpoint costs one dictionary lookup. Tests run a job in a subprocess with a failpoint,
rerun it without one, and compare its outputs with those of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "failpoint", "parse_failpoints"]

ENV = "LUMREC_FAILPOINTS"
_hits: dict[str, int] = {}


def parse_failpoints(spec: str) -> dict[str, int]:
    """{name: hit that kills} of a spec "name[@N],..." (N defaults to 1)."""
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.partition("@")
        try:
            points[name] = int(count) if count else 1
        except ValueError:
            raise ValueError(f"{ENV}: {item!r} is not name or name@N") from None
        if points[name] < 1:
            raise ValueError(f"{ENV}: {item!r}: N must be >= 1")
    return points


def failpoint(name: str) -> None:
    """SIGKILL this process if `name` is armed in $LUMREC_FAILPOINTS and this is its armed hit."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    armed = parse_failpoints(spec).get(name)
    if armed is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == armed:
        os.kill(os.getpid(), signal.SIGKILL)
