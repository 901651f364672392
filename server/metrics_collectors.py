"""The collectors `server.metrics` registers that compute their series at scrape time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ctxsteer.server.engine.interface import AsyncEngine

NAMESPACE = "ctxsteer"
PREFIX = NAMESPACE + "_"
MODEL_LABEL = "model_name"


class EngineGauges(Collector):
    """Running/waiting/KV usage straight from the engine at scrape time: never stale, no update path."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, doc, labels=[MODEL_LABEL])

        return (
            gauge("num_requests_running", "Requests in the running batch (prefilling or decoding)."),
            gauge("num_requests_waiting", "Requests waiting for a batch slot."),
            gauge(
                "kv_cache_usage_perc",
                "Fraction (0-1) of the KV/token budget reserved by admitted requests or held by the prefix "
                "cache.",
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        for family, value in zip(
            self._families(), (stats.running, stats.waiting, stats.kv_usage), strict=True
        ):
            family.add_metric([self.model_name], float(value))
            yield family


class WithModelName(Collector):
    """Adds `model_name` to another collector's series (ProcessCollector has no labels of its own)."""

    def __init__(self, inner: Collector, model_name: str) -> None:
        self.inner = inner
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            family.samples = [
                s._replace(labels={**s.labels, MODEL_LABEL: self.model_name}) for s in family.samples
            ]
            yield family


class WithoutCreated(Collector):
    """The registry minus prometheus_client's `*_created` samples, which the text format exposes as one
    extra gauge series per counter/histogram (a per-instance setting; the library's switch is global)."""

    def __init__(self, inner: Collector) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
