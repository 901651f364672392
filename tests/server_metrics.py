"""Read a live server's /metrics the way Prometheus does (its own text parser), for tests that check or
wait on what the server did rather than on the clock. `url` is the server's base URL (no /v1); /metrics is
public unless the server has a metrics key."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` (e.g. "ctxsteer_request_success_total")."""
    text = httpx.get(url + "/metrics", timeout=30).text
    families = text_string_to_metric_families(text)
    return [(s.labels, s.value) for family in families for s in family.samples if s.name == name]


def total(url: str, name: str) -> float:
    """The sum of the samples called `name` over all their labels."""
    return sum(value for _, value in samples(url, name))


def finished_requests(url: str) -> dict[str, float]:
    """Finished requests by finish reason ("stop", "length", "abort", ...), summed over the other labels."""
    counts: dict[str, float] = {}
    for labels, value in samples(url, "ctxsteer_request_success_total"):
        counts[labels["finished_reason"]] = counts.get(labels["finished_reason"], 0) + value
    return counts
