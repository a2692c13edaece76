"""Latency quantiles in fixed memory (``llm.types.Latencies``): close to the exact ones, whatever the count."""

from __future__ import annotations

import math
import random

from boostqa_assets.llm.types import Latencies


def _exact(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def test_quantiles_are_within_half_a_percent_of_the_exact_ones() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(-1.0, 1.2) for _ in range(20_000)] + [0.0, 1e-9, 3600.0]
    lat = Latencies()
    for v in values:
        lat.append(v)
    assert len(lat) == len(values)
    for q in (0.01, 0.5, 0.95, 0.99, 1.0):
        exact = max(_exact(values, q), Latencies._FLOOR_S)
        assert abs(lat.quantile(q) - exact) <= Latencies.ALPHA * exact * 1.0001, q


def test_memory_stays_a_few_thousand_counters() -> None:
    lat = Latencies()
    for i in range(200_000):
        lat.append(0.001 + (i % 10_000) * 0.0005)  # 1 ms .. 5 s
    assert len(lat) == 200_000
    assert len(lat.counts) < 1_000  # one counter per 1% of range, not one float per request
    assert Latencies().quantile(0.5) == 0.0
