"""`make test-docker`: build the CPU image for real, run it, then the compose stack with Prometheus.

Opt-in (minutes of building; not in `make test`). Works where no image registry is reachable:
- no Docker engine answering: starts `dockerd` (Debian's docker.io, installed when missing and root) with
  the settings that work in a sandbox (vfs storage, no iptables, no default bridge) and stops it at the end;
- no `python:3.11-slim-bookworm`: a Debian + Python 3.11 base made by scripts/docker_base.sh (debootstrap);
- PyTorch's CPU index unreachable: the CPU torch wheel on this disk (pip's find-links) served to the build
  from 127.0.0.1;
- no `prom/prometheus`: Prometheus from Debian's package (docker/Dockerfile.prometheus-debian);
- no BuildKit (`buildx`): the classic builder, which reads the root .dockerignore.
Checks: /ready, one steered request, /metrics counting it, the image's HEALTHCHECK turning healthy, a clean
stop; then `docker compose up` of the server + Prometheus and Prometheus scraping the server. Figures go to
stdout and build/docker/summary.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from ctxsteer.server.bench.launch import free_port, wait_ready

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "build" / "docker"
IMAGE = "ctxsteer:cpu"
PYTHON_IMAGE = "python:3.11-slim-bookworm"  # Dockerfile.cpu's default base
LOCAL_BASE = "ctxsteer/base:bookworm-py311"
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.2"  # compose.yaml's default
LOCAL_PROMETHEUS = "ctxsteer/prometheus:debian"
TORCH_VERSION = "2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
WHEEL_PORT = 38741
NETWORK = "ctxsteer-test"
CONTAINER = "ctxsteer-test-cpu"
STEERED = {
    "messages": [
        {
            "role": "user",
            "content": "Context: The secret password is BANANA-42.\nQuestion: What is the secret password?",
        }
    ],
    "max_tokens": 24,
    "temperature": 0,
    "steering": {"strength": 2},
}


def log(msg: str) -> None:
    print(f"[test-docker] {msg}", flush=True)


def run(
    *cmd: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def must(*cmd: str, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    done = run(*cmd, timeout=timeout, env=env)
    if done.returncode != 0:
        raise SystemExit(
            f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return done.stdout


def logged(log_path: Path, *cmd: str, env: dict[str, str] | None = None, timeout: float = 3600) -> float:
    """Run with output to a log file; seconds taken. Fails with the log's tail."""
    t0 = time.monotonic()
    with log_path.open("w") as f:
        done = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env={**os.environ, **(env or {})}
        )
    if done.returncode != 0:
        raise SystemExit(
            f"`{' '.join(cmd)}` failed ({done.returncode}); log {log_path}:\n{log_path.read_text()[-3000:]}"
        )
    return time.monotonic() - t0


def wait_for(check: Callable[[], Any], what: str, timeout_s: float, every_s: float = 1.0) -> float:
    """Seconds until `check()` is truthy (exceptions count as not yet)."""
    t0 = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


# ---------------------------------------------------------------------------------------------- engine


def engine_answers() -> bool:
    return shutil.which("docker") is not None and run("docker", "info", timeout=30).returncode == 0


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(
            f"need {' '.join(packages)} (Debian packages) and cannot install them: not root or no apt-get"
        )
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    must("apt-get", "update", timeout=900, env=env)
    must("apt-get", "install", "-y", "--no-install-recommends", *packages, timeout=1800, env=env)


@contextlib.contextmanager
def docker_engine() -> Iterator[None]:
    """Use the engine that answers, else start one for the run (stopped at the end; images stay)."""
    if engine_answers():
        log("using the running Docker engine")
        yield
        return
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        log("installing Debian's docker.io")
        apt_install("docker.io")
    log("starting dockerd (vfs storage, no iptables, no default bridge)")
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "dockerd.log").open("w") as f:
        proc = subprocess.Popen(
            ["dockerd", "--storage-driver=vfs", "--iptables=false", "--bridge=none"],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(engine_answers, "dockerd to answer", 90)
        yield
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)


def build_env() -> dict[str, str]:
    """The classic builder where the client has no BuildKit (`docker buildx` missing)."""
    return {} if run("docker", "buildx", "version", timeout=30).returncode == 0 else {"DOCKER_BUILDKIT": "0"}


def have_image(tag: str) -> bool:
    return run("docker", "image", "inspect", tag, timeout=30).returncode == 0


def obtain(tag: str) -> bool:
    """Present locally or pulled (False where no registry answers)."""
    if have_image(tag):
        return True
    try:
        return run("docker", "pull", tag, timeout=180).returncode == 0
    except subprocess.TimeoutExpired:
        return False


# --------------------------------------------------------------------------------------------- torch


def find_links_dirs() -> list[Path]:
    """Directories pip is configured to take wheels from (PIP_FIND_LINKS, pip config)."""
    raw = os.environ.get("PIP_FIND_LINKS", "")
    cfg = run(sys.executable, "-m", "pip", "config", "list", timeout=60).stdout
    raw += " " + " ".join(re.findall(r"find-links='([^']*)'", cfg))
    dirs = []
    for item in raw.split():
        path = Path(item.removeprefix("file://"))
        if path.is_dir() and path not in dirs:
            dirs.append(path)
    return dirs


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


@contextlib.contextmanager
def torch_source() -> Iterator[dict[str, str]]:
    """Build args for the torch install: PyTorch's CPU index when it answers, else a local CPU wheel
    served over 127.0.0.1 for the build's duration."""
    try:
        reachable = httpx.get(f"{TORCH_CPU_INDEX}/torch/", timeout=10).status_code == 200
    except httpx.HTTPError:
        reachable = False
    if reachable:
        log(f"torch from {TORCH_CPU_INDEX}")
        yield {}
        return
    pattern = f"torch-{TORCH_VERSION}+cpu-cp311-*.whl"
    wheel = next((w for d in find_links_dirs() for w in sorted(d.glob(pattern))), None)
    if wheel is None:
        raise SystemExit(f"PyTorch's index is unreachable and no local {pattern} is in pip's find-links")
    handler = functools.partial(_QuietHandler, directory=str(wheel.parent))
    try:  # a fixed port keeps the build argument, hence Docker's layer cache, the same from run to run
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    log(f"torch: PyTorch's index unreachable; serving {wheel.name} from {url}")
    try:
        yield {"TORCH_INDEX": "", "TORCH_FIND_LINKS": url, "TORCH_SPEC": f"torch=={TORCH_VERSION}+cpu"}
    finally:
        server.shutdown()


# -------------------------------------------------------------------------------------------- checks


def metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def check_steered(url: str) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/chat/completions", json=STEERED, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["steering"]["strength"] == 2 and body["steering"]["steered_tokens"] > 0, body
    assert body["choices"][0]["message"]["content"].strip(), body
    return body


def health(container: str) -> str:
    return must("docker", "inspect", "-f", "{{.State.Health.Status}}", container).strip()


def image_size_mb(tag: str) -> float:
    return int(must("docker", "image", "inspect", "-f", "{{.Size}}", tag).strip()) / 1e6


def single_container(summary: dict[str, Any]) -> None:
    if run("docker", "network", "inspect", NETWORK).returncode != 0:
        must("docker", "network", "create", NETWORK)  # the default bridge may be off (--bridge=none)
    run("docker", "rm", "-f", CONTAINER)
    port = free_port()
    t0 = time.monotonic()
    must(
        "docker", "run", "-d", "--name", CONTAINER, "--network", NETWORK,
        "-p", f"127.0.0.1:{port}:8000", "-e", "HF_HUB_OFFLINE=1", IMAGE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        summary["time_to_ready_s"] = round(wait_ready(url, timeout_s=300, every_s=1.0), 1)
        log(f"container ready in {summary['time_to_ready_s']} s")
        body = check_steered(url)
        summary["steered_answer"] = body["choices"][0]["message"]["content"]
        text = httpx.get(f"{url}/metrics", timeout=10).text
        steered = metric(text, "ctxsteer_steered_requests_total")
        assert steered >= 1 and metric(text, "ctxsteer_request_success_total") >= 1, (
            "metrics did not count it"
        )
        log(f"steered request ok ({summary['steered_answer']!r}); /metrics counts {steered:.0f} steered")
        wait_for(lambda: health(CONTAINER) == "healthy", "the HEALTHCHECK to pass", 180)
        summary["time_to_healthy_s"] = round(time.monotonic() - t0, 1)
        log(f"HEALTHCHECK healthy {summary['time_to_healthy_s']} s after start")
        t_stop = time.monotonic()
        must("docker", "stop", "-t", "40", CONTAINER, timeout=90)
        summary["stop_s"] = round(time.monotonic() - t_stop, 1)
        code = int(must("docker", "inspect", "-f", "{{.State.ExitCode}}", CONTAINER).strip())
        assert code == 0, (
            f"the server exited {code} on SIGTERM:\n" + run("docker", "logs", CONTAINER).stderr[-2000:]
        )
        log(f"stopped cleanly in {summary['stop_s']} s (exit 0)")
    except BaseException:
        print(run("docker", "logs", CONTAINER).stderr[-3000:], file=sys.stderr)
        raise
    finally:
        run("docker", "rm", "-f", CONTAINER)


def compose_cmd() -> list[str]:
    if run("docker", "compose", "version").returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is None:
        log("installing Debian's docker-compose")
        apt_install("docker-compose")
    return ["docker-compose"]


def compose_stack(summary: dict[str, Any], base: str | None, env: dict[str, str]) -> None:
    compose_env = dict(env)
    if not obtain(PROMETHEUS_IMAGE):
        log(f"no {PROMETHEUS_IMAGE}: building Prometheus from Debian's package")
        args = ["--build-arg", f"BASE_IMAGE={base}"] if base else []
        logged(
            OUT / "build-prometheus.log", "docker", "build", "--network", "host", *args,
            "-f", "docker/Dockerfile.prometheus-debian", "-t", LOCAL_PROMETHEUS, "docker", env=env,
        )  # fmt: skip
        compose_env["PROMETHEUS_IMAGE"] = LOCAL_PROMETHEUS
    for port in (8000, 9090):
        if not port_free(port):
            raise SystemExit(f"port {port} is taken on 127.0.0.1: compose.yaml publishes it")
    compose = [*compose_cmd(), "-f", "docker/compose.yaml"]
    up = [*compose, "up", "-d", "--no-build", "ctxsteer-cpu", "prometheus"]
    try:
        os.chdir(REPO)
        must(*up, timeout=300, env=compose_env)
        log(f"{' '.join(up)}")
        url, prom = "http://127.0.0.1:8000", "http://127.0.0.1:9090"
        summary["compose_time_to_ready_s"] = round(wait_ready(url, timeout_s=300, every_s=1.0), 1)
        check_steered(url)

        def scraped() -> bool:
            targets = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            up_ = any(t["labels"]["job"] == "ctxsteer" and t["health"] == "up" for t in targets)
            q = httpx.get(
                f"{prom}/api/v1/query", params={"query": "ctxsteer_steered_requests_total"}, timeout=5
            )
            series = q.json()["data"]["result"]
            return up_ and any(float(s["value"][1]) >= 1 for s in series)

        summary["prometheus_scrape_s"] = round(
            wait_for(scraped, "Prometheus to scrape ctxsteer:8000", 120), 1
        )
        log(
            f"Prometheus scrapes the server (target up, steered counter seen) "
            f"in {summary['prometheus_scrape_s']} s"
        )
        summary["compose"] = " ".join(compose[:2] if compose[0] == "docker" else compose[:1])
    except BaseException:
        print(run(*compose, "logs", "--tail", "50", env=compose_env).stdout[-4000:], file=sys.stderr)
        raise
    finally:
        run(*compose, "down", "-v", timeout=120, env=compose_env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-compose", action="store_true", help="only the single-container checks")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"machine": os.uname().machine, "cpus": os.cpu_count()}
    with docker_engine():
        env = build_env()
        summary["builder"] = "classic" if env else "buildkit"
        base = None
        if not obtain(PYTHON_IMAGE):
            made = "using" if have_image(LOCAL_BASE) else "making"
            log(f"no {PYTHON_IMAGE} (no registry?): {made} {LOCAL_BASE} (debootstrap)")
            must("bash", str(REPO / "scripts" / "docker_base.sh"), LOCAL_BASE, timeout=1800)
            base = LOCAL_BASE
        summary["base_image"] = base or PYTHON_IMAGE
        with torch_source() as torch_args:
            build_args = {**torch_args, **({"PYTHON_IMAGE": base} if base else {})}
            cmd = ["docker", "build", "--network", "host", "-f", "docker/Dockerfile.cpu", "-t", IMAGE]
            for k, v in build_args.items():
                cmd += ["--build-arg", f"{k}={v}"]
            log(f"building {IMAGE} (log: {OUT / 'build-cpu.log'})")
            os.chdir(REPO)
            summary["build_s"] = round(logged(OUT / "build-cpu.log", *cmd, ".", env=env), 1)
        summary["image_size_mb"] = round(image_size_mb(IMAGE))
        log(f"built in {summary['build_s']} s, image {summary['image_size_mb']} MB")
        single_container(summary)
        if not args.skip_compose:
            compose_stack(summary, base, env)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    log("passed")


if __name__ == "__main__":
    main()
