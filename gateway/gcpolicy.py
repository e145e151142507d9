"""The garbage collector's settings for a serving gateway process (`gateway serve`).

Reference counting frees almost everything a transaction allocates; the cyclic collector only has to
find the rare cycle (an exception's traceback, a cancelled task). With CPython's defaults it runs a
young-generation pass every 700 new container objects (every two or three transactions here) and, as
the long-lived population grows, full passes over every object the process holds: the key store, the
dialects, the metric families, the config. Sampled at saturation (py-spy --native, bench/gateway.py),
that was 11-13 % of the gateway's CPU, more than the codec and the crypto together.

So, once start-up is over:

* `gc.freeze()` moves everything that exists then (the start-up objects, which live as long as the
  process) out of the collector's sight: no later pass walks them again;
* the young-generation threshold goes from 700 to `YOUNG_THRESHOLD`: a pass then finds most of what
  was allocated since the last one already freed by reference counting, so it walks far fewer live
  objects per transaction. Cycles are still collected, a few hundred transactions later than before:
  a bounded delay, not a leak (the RSS run of bench/gateway.py watches for growth).

Only the serving process does this: in a test process that starts many gateways, freezing would keep
each one's start-up objects for the rest of the run.
"""

from __future__ import annotations

import gc
from typing import Final

#: new container objects between young-generation passes (CPython's default: 700)
YOUNG_THRESHOLD: Final = 20_000


def settle_after_startup() -> None:
    """Collect what start-up left behind, freeze the survivors, and space out the young passes."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
