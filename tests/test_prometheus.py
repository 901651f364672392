"""A real Prometheus scrapes a live `ctxsteer serve` every second: every metric family has series, and every
PromQL expression of the Grafana dashboard (docker/grafana/dashboards) parses and returns data.

Prometheus comes from the Debian `prometheus` package, installed here when missing (CI machines are fresh);
the test skips, saying why, only where the package cannot be installed.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from debian_packages import ensure_binaries
from server_process import ServerProcess, free_port, serve
from tiny import save_tiny_model
from waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "ctxsteer.json"
API_KEY = "test-api-key"
METRICS_KEY = "test-metrics-key"
# What the test puts for Grafana's $__rate_interval: it must reach back to the scrape before the traffic
# however long a loaded machine takes over the test, or rates fall to 0 and quantiles to NaN.
RATE_WINDOW = "30m"
SCRAPES = f'count_over_time(up{{job="ctxsteer"}}[{RATE_WINDOW}])'  # scrapes of the server so far

# Every family a served server must export (histograms by their _bucket series).
FAMILIES = (
    "ctxsteer_num_requests_running",
    "ctxsteer_num_requests_waiting",
    "ctxsteer_kv_cache_usage_perc",
    "ctxsteer_model_info",
    "ctxsteer_prompt_tokens_total",
    "ctxsteer_generation_tokens_total",
    "ctxsteer_request_success_total",
    "ctxsteer_requests_rejected_total",
    "ctxsteer_time_to_first_token_seconds_bucket",
    "ctxsteer_inter_token_latency_seconds_bucket",
    "ctxsteer_e2e_request_latency_seconds_bucket",
    "ctxsteer_request_queue_time_seconds_bucket",
    "ctxsteer_request_prompt_tokens_bucket",
    "ctxsteer_request_generation_tokens_bucket",
    "ctxsteer_batch_size_bucket",
    "ctxsteer_steering_strength_bucket",
    "ctxsteer_steered_requests_total",
    "ctxsteer_steered_prompt_tokens_total",
    "ctxsteer_steered_token_fraction_bucket",
    "ctxsteer_context_attention_ratio_bucket",
    "ctxsteer_http_requests_total",
    "ctxsteer_http_request_duration_seconds_bucket",
    "ctxsteer_process_cpu_seconds_total",
    "ctxsteer_process_resident_memory_bytes",
)


def ensure_prometheus() -> tuple[str, str]:
    """(prometheus, promtool) paths; installs the Debian package when missing, else skips saying why."""
    prometheus, promtool = ensure_binaries(("prometheus", "promtool"), ("prometheus",))
    return prometheus, promtool


@dataclass
class Prometheus:
    url: str
    http: httpx.Client

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; fails the test when Prometheus rejects it (a PromQL parse error, say)."""
        r = self.http.get("/api/v1/query", params={"query": expr})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}\n-> {r.status_code} {body}"
        return body["data"]["result"]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else math.nan


@pytest.fixture(scope="module")
def prometheus_bins() -> tuple[str, str]:
    """Before the server starts: a skip or a slow install should not keep a server idling."""
    return ensure_prometheus()


@pytest.fixture(scope="module")
def server(
    prometheus_bins: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One running slot and no queue, so a second concurrent request is refused (queue_full). The long
    context lets the aborted request hold the slot for seconds, however fast the machine."""
    model_dir = save_tiny_model(
        tmp_path_factory.mktemp("long") / "llama", "llama", max_position_embeddings=4096
    )
    args = ("--max-num-seqs", "1", "--max-queue", "0", "--api-key", API_KEY, "--metrics-api-key", METRICS_KEY)
    with serve(str(model_dir), *args, log_dir=tmp_path_factory.mktemp("serve-logs")) as sp:
        yield sp


@pytest.fixture(scope="module")
def prometheus(
    prometheus_bins: tuple[str, str], server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary, promtool = prometheus_bins
    work = tmp_path_factory.mktemp("prometheus")
    config = {  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "ctxsteer",
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer", "credentials": METRICS_KEY},
                "static_configs": [{"targets": [server.url.removeprefix("http://")]}],
            }
        ],
    }
    config_file = work / "prometheus.yml"
    config_file.write_text(json.dumps(config, indent=1))
    check = subprocess.run([promtool, "check", "config", str(config_file)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=10) as http:

            def ready() -> bool:
                assert proc.poll() is None, (work / "prometheus.log").read_text()
                try:
                    return http.get("/-/ready").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, "Prometheus to start")
            yield Prometheus(url, http)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _drive_traffic(sp: ServerProcess, model: str) -> None:
    """Steered and plain, streamed and not, one aborted, and one rejection of each reason."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    msgs = [{"role": "user", "content": "Context: the vault code is 4127. Question: what is the vault code?"}]
    base = {"model": model, "messages": msgs, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=sp.url, headers=auth, timeout=60) as http:

        def ok(body: dict[str, Any]) -> None:
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text

        ok({**base, "max_tokens": 6, "steering": {"strength": 3}, "report": {"context_attention": True}})
        ok({**base, "max_tokens": 5, "steering": {"strength": 1.5}})
        ok({**base, "max_tokens": 4})
        with http.stream(
            "POST", "/v1/chat/completions", json={**base, "max_tokens": 4, "stream": True}
        ) as st:
            assert st.status_code == 200 and any(line == "data: [DONE]" for line in st.iter_lines())
        with http.stream(
            "POST", "/v1/chat/completions", json={**base, "max_tokens": 3000, "stream": True}
        ) as st:
            lines = st.iter_lines()  # kept: a dropped line iterator closes the stream, which aborts it
            assert next(lines).startswith("data: ")
            refused = http.post("/v1/chat/completions", json={**base, "max_tokens": 2})
            assert refused.status_code == 429, refused.text  # queue_full
        # closing the stream aborted it
        too_long = http.post("/v1/chat/completions", json={**base, "max_tokens": 100_000})
        assert too_long.json()["error"]["code"] == "context_length_exceeded"
        bad = http.post(
            "/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"}
        )
        assert bad.status_code == 400  # invalid
        assert httpx.post(sp.url + "/v1/chat/completions", json=base).status_code == 401  # unauthorized


def _dashboard_queries() -> tuple[list[str], list[str]]:
    """(every target expression of every panel, every template-variable query) of the dashboard JSON."""
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dash["panels"])
    variables = [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs, variables


def _bind(expr: str, model: str) -> str:
    """Put in what Grafana would for the dashboard's variables."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", RATE_WINDOW, expr)
    value = re.escape(model).replace("\\", "\\\\")  # a regex inside a PromQL string: backslashes doubled
    return re.sub(r"\$\{?model_name\}?", lambda _: value, expr)


def test_prometheus_scrapes_every_family_and_dashboard_query(
    server: ServerProcess, prometheus: Prometheus
) -> None:
    model = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    model = model["data"][0]["id"]
    # One request and a scrape before the traffic, so that rate() over the window sees every counter rise,
    # including the HTTP series, which exist only once their route has answered.
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    assert (
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=auth, timeout=60).status_code
        == 200
    )
    wait_for(
        lambda: prometheus.scalar('sum(ctxsteer_http_requests_total{route="/v1/chat/completions"})') == 1,
        "a scrape after the first request",
    )
    _drive_traffic(server, model)
    wait_for(
        lambda: (
            prometheus.scalar('sum(ctxsteer_request_success_total{finished_reason="abort"})') == 1
            and prometheus.scalar("sum(ctxsteer_requests_rejected_total)") == 4
            and prometheus.scalar("sum(ctxsteer_request_success_total)") == 6
        ),
        "Prometheus to scrape the traffic",
    )
    # Two more good scrapes: every window has samples on both sides of the traffic (a failed scrape marks
    # every series stale until the next one, so the last one must be good).
    scraped = prometheus.scalar(SCRAPES)
    wait_for(
        lambda: prometheus.scalar(SCRAPES) >= scraped + 2 and prometheus.scalar('up{job="ctxsteer"}') == 1,
        "two more successful scrapes",
    )

    reasons = {
        r["metric"]["reason"]: float(r["value"][1])
        for r in prometheus.query("ctxsteer_requests_rejected_total")
    }
    assert reasons == {"queue_full": 1, "too_long": 1, "invalid": 1, "unauthorized": 1}
    assert prometheus.scalar('sum(ctxsteer_steered_requests_total{steered="true"})') == 2
    assert prometheus.scalar("sum(ctxsteer_steering_strength_count)") == 2

    empty = [f for f in FAMILIES if not prometheus.query(f'count({f}{{model_name="{model}"}})')]
    assert not empty, f"families without series in Prometheus: {empty}"

    exprs, variables = _dashboard_queries()
    assert len(exprs) >= 20

    def without_data(exprs: list[str]) -> list[str]:
        out = []
        for expr in exprs:
            result = prometheus.query(_bind(expr, model))  # asserts that it parses
            if not any(math.isfinite(float(r["value"][1])) for r in result):
                out.append(expr)
        return out

    # A scrape that failed on a loaded machine blanks every series until the next good one: ask again
    # until all have data (the queries that never get any fail at the deadline, listed).
    no_data = list(exprs)

    def all_have_data() -> bool:
        no_data[:] = without_data(no_data)
        return not no_data

    def health() -> str:
        scrapes = prometheus.query('{__name__=~"up|scrape_duration_seconds", job="ctxsteer"}')
        return f"data for the dashboard queries ({scrapes}):\n" + "\n".join(no_data)

    wait_for(all_have_data, health, every_s=0.5)

    # the shipped alerting rules evaluate against the live series (a parse error fails the query)
    rules = yaml.safe_load((REPO / "docker" / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert exprs and all(prometheus.query(e) is not None for e in exprs)
    # ...and the context-attention series they read has the measured request of the traffic
    assert prometheus.scalar("sum(ctxsteer_context_attention_ratio_count)") >= 1

    for var in variables:  # Grafana's label_values(metric, label), asked the way Grafana asks it
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var).groups()
        r = prometheus.http.get(f"/api/v1/label/{label}/values", params={"match[]": metric}).json()
        assert model in r["data"], f"{var} -> {r}"
