"""Reduced `benchmarks/soak.py`: 1000 requests through `python -m gateway` in front of the FAST ENGINE TEST
DOUBLE; the gateway's RSS must stay flat after warm-up and every stream must end with [DONE].
(The full run, 10k requests plus the 64-client bursts, is `python benchmarks/soak.py`.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RSS_GROWTH_LIMIT_MIB = 25.0


def test_soak_reduced() -> None:
    from build_engine.cpu import cache_root, prepare

    prepare(cache_root())  # a no-op once prepared
    plan = soak.SoakPlan(
        engine="double",
        clients=64,
        rounds=1,
        max_concurrent=24,
        max_queued=16,
        max_tokens=20,
        requests=1000,
        concurrency=16,
        soak_max_tokens=8,
        token_interval_us=5000,
    )
    result = soak.run(plan)
    print(f"\n[soak] {result}")
    load, run = result["load"], result["soak"]
    assert not load["failures"] and not run["failures"]
    burst = load["per_round"][0]
    # At least the admitted + queued ones are served; streams that finish during the burst free slots.
    assert burst["accepted"] >= 40 and burst["accepted"] + burst["rejected_429"] == 64
    assert set(run["statuses"]) == {200}
    assert run["rss_growth_after_warmup_mib"] < RSS_GROWTH_LIMIT_MIB
