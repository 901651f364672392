"""Static checks of deploy/: the Kubernetes manifest parses and hangs together (image, engine, probes,
ports, selectors, GPU limit, grace period vs drain), and every `ctxsteer serve` flag written in
deploy/README.md or the manifest's args is one the server has. No cluster is needed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctxsteer.server.config import _FLAGS

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MANIFEST = DEPLOY / "k8s" / "ctxsteer.yaml"
README = DEPLOY / "README.md"
IMAGE = "ctxsteer:cuda"

# vLLM's flags, which `ctxsteer serve --engine vllm` passes through under vLLM's names. They are added to
# the CLI by the vLLM backend, not (yet) by server/config.py's _FLAGS, so they are listed here.
VLLM_FLAGS = frozenset(
    {
        "--engine",
        "--tensor-parallel-size",
        "--pipeline-parallel-size",
        "--data-parallel-size",
        "--distributed-executor-backend",
        "--gpu-memory-utilization",
        "--enforce-eager",
        "--max-num-batched-tokens",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
    }
)
SERVE_FLAGS = frozenset(f.flag for f in _FLAGS) | VLLM_FLAGS
# Other tools' flags that deploy/README.md's prose quotes in `code` spans (docker's, Ray's).
OTHER_TOOL_FLAGS = frozenset({"--gpus", "--block"})


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return load_docs(MANIFEST)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {MANIFEST.name}, found {len(found)}"
    return found[0]


def server_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    matching = [c for c in containers if c.get("image", "").rsplit("/", 1)[-1] == IMAGE]
    assert len(matching) == 1, f"expected one container running {IMAGE}, got {containers}"
    return matching[0]


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of `flag` in an argv (`--flag value` or `--flag=value`); None if absent."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or container port name) as the container port number."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"port name {port!r} is not one of the container's ports {named}"
    return named[port]


def serve_flags(argv_text: str) -> list[str]:
    """The --flags in a `ctxsteer serve` argument string, without values or `=value` parts."""
    return [t.split("=", 1)[0] for t in shlex.split(argv_text, comments=True) if t.startswith("--")]


def readme_serve_commands(text: str) -> list[str]:
    """The argument strings of every `ctxsteer serve …` command in the README's shell blocks, and of
    `docker run … ctxsteer:cuda …` (the image's entrypoint is `ctxsteer serve`; `--entrypoint` runs
    something else, so those are skipped). Continuation lines are joined."""
    out = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
            if "ctxsteer serve" in line:
                out.append(line.split("ctxsteer serve", 1)[1])
            elif "docker run" in line and "--entrypoint" not in line and re.search(r"\sctxsteer:\w+", line):
                out.append(re.split(r"\sctxsteer:\w+", line, maxsplit=1)[1])
    return out


def readme_inline_flags(text: str) -> set[str]:
    """The --flags that open `code` spans in the README's prose (outside fenced blocks)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return {m.group(1) for m in re.finditer(r"`(--[a-z][a-z0-9-]*)", prose)}


# --- the manifest ---------------------------------------------------------------------------------------


def test_every_document_is_a_named_kubernetes_object(docs: list[dict[str, Any]]) -> None:
    assert docs, f"{MANIFEST} has no documents"
    for d in docs:
        assert isinstance(d, dict), d
        assert d.get("apiVersion"), d
        assert d.get("kind"), d
        assert d.get("metadata", {}).get("name"), d
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget"} <= kinds


def test_deployment_runs_the_cuda_image_with_vllm(docs: list[dict[str, Any]]) -> None:
    dep = one(docs, "Deployment")
    assert dep["apiVersion"] == "apps/v1"
    assert dep["spec"]["replicas"] >= 2, "a fleet: more than one replica"
    c = server_container(dep)
    args = [str(a) for a in c["args"]]
    assert "command" not in c, "the image's entrypoint (`ctxsteer serve`) must stay"
    assert flag_value(args, "--engine") == "vllm"
    assert flag_value(args, "--model"), "a model is named"
    assert flag_value(args, "--tensor-parallel-size") == "1"
    limits = c["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == int(flag_value(args, "--tensor-parallel-size") or 1)


def test_api_key_comes_from_a_secret_not_the_args(docs: list[dict[str, Any]]) -> None:
    c = server_container(one(docs, "Deployment"))
    assert "--api-key" not in [str(a).split("=", 1)[0] for a in c["args"]]
    env = {e["name"]: e for e in c.get("env", [])}
    ref = env["CTXSTEER_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"] and not ref.get("optional", False)


def test_probes_hit_ready_and_health_on_the_container_port(docs: list[dict[str, Any]]) -> None:
    c = server_container(one(docs, "Deployment"))
    ports = [p["containerPort"] for p in c["ports"]]
    assert len(ports) == 1
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert int(env.get("CTXSTEER_PORT", 8000)) == ports[0], "the server listens on the declared port"
    expected = {"readinessProbe": "/ready", "livenessProbe": "/health", "startupProbe": "/health"}
    for probe, path in expected.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path, probe
        assert port_number(c, get["port"]) == ports[0], probe
    # vLLM start-up takes minutes: the startup probe must allow at least 10 of them.
    s = c["startupProbe"]
    assert s.get("initialDelaySeconds", 0) + s["periodSeconds"] * s["failureThreshold"] >= 600
    assert c["livenessProbe"]["failureThreshold"] >= 3


def test_grace_period_outlasts_the_drain(docs: list[dict[str, Any]]) -> None:
    dep = one(docs, "Deployment")
    c = server_container(dep)
    drain = float(flag_value([str(a) for a in c["args"]], "--drain-timeout") or 30)
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > 30
    assert grace > drain + sleep


def test_model_cache_volume_is_hf_home(docs: list[dict[str, Any]]) -> None:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = server_container(one(docs, "Deployment"))
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "/cache" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    cache = volumes[mounts["/cache"]]
    assert "emptyDir" in cache or "persistentVolumeClaim" in cache
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env.get("HF_HOME", "/cache/huggingface").startswith("/cache/")


def test_service_selects_the_pods_and_targets_the_container_port(docs: list[dict[str, Any]]) -> None:
    dep, svc = one(docs, "Deployment"), one(docs, "Service")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects(dep["spec"]["selector"]["matchLabels"], labels)
    spec = svc["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP"
    assert spec.get("sessionAffinity") == "None"
    assert selects(spec["selector"], labels), f"Service selector {spec['selector']} misses {labels}"
    c = server_container(dep)
    (port,) = spec["ports"]
    assert port["port"] == 8000
    assert port_number(c, port.get("targetPort", port["port"])) == c["ports"][0]["containerPort"]


def test_pdb_selects_the_pods(docs: list[dict[str, Any]]) -> None:
    dep, pdb = one(docs, "Deployment"), one(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])
    if "minAvailable" in pdb["spec"]:
        assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"], "drains could never proceed"


def test_prometheus_annotations_point_at_metrics(docs: list[dict[str, Any]]) -> None:
    dep = one(docs, "Deployment")
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == server_container(dep)["ports"][0]["containerPort"]


# --- flags ----------------------------------------------------------------------------------------------


def test_manifest_args_are_serve_flags(docs: list[dict[str, Any]]) -> None:
    args = [str(a) for a in server_container(one(docs, "Deployment"))["args"]]
    unknown = set(serve_flags(shlex.join(args))) - SERVE_FLAGS
    assert not unknown, f"{MANIFEST.name} passes flags `ctxsteer serve` does not have: {sorted(unknown)}"


def test_readme_serve_flags_exist() -> None:
    commands = readme_serve_commands(README.read_text())
    assert len(commands) >= 3, commands  # one box, multi-node, docker run
    used = {f for c in commands for f in serve_flags(c)}
    assert {"--engine", "--tensor-parallel-size", "--pipeline-parallel-size"} <= used
    unknown = (used - SERVE_FLAGS) | (
        readme_inline_flags(README.read_text()) - SERVE_FLAGS - OTHER_TOOL_FLAGS
    )
    assert not unknown, f"deploy/README.md uses flags `ctxsteer serve` does not have: {sorted(unknown)}"


# --- the checks can fail --------------------------------------------------------------------------------


def test_checks_catch_a_broken_manifest(docs: list[dict[str, Any]]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(one(docs, "Service")))
    broken["spec"]["selector"] = {"app.kubernetes.io/name": "not-ctxsteer"}
    with pytest.raises(AssertionError):
        test_service_selects_the_pods_and_targets_the_container_port(
            [d for d in docs if d["kind"] != "Service"] + [broken]
        )
    dep = yaml.safe_load(yaml.safe_dump(one(docs, "Deployment")))
    dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
    with pytest.raises(AssertionError):
        test_grace_period_outlasts_the_drain([dep])


def test_flag_extraction_catches_unknown_flags() -> None:
    text = (
        "```bash\nctxsteer serve M --engine vllm \\\n"
        "  --tensor-parallel-size 2 --no-such-flag=1  # --x\n```\n"
    )
    (cmd,) = readme_serve_commands(text)
    assert serve_flags(cmd) == ["--engine", "--tensor-parallel-size", "--no-such-flag"]
    assert set(serve_flags(cmd)) - SERVE_FLAGS == {"--no-such-flag"}
    docker = "```bash\ndocker run --rm --gpus all -p 8000:8000 ctxsteer:cuda --engine vllm --bogus\n```\n"
    assert serve_flags(readme_serve_commands(docker)[0]) == ["--engine", "--bogus"]
    assert readme_inline_flags("Set `--drain-timeout 30` or `--bogus`.\n```bash\n`--x`\n```\n") == {
        "--drain-timeout",
        "--bogus",
    }
