"""The deploy files against the code: setting names, required settings, probes, ports, metrics."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from proxy.metrics import Metrics
from proxy.settings import DEFAULT_SECRETS_DIR, Settings
from proxy.web.app import create_app

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yaml"
DASHBOARD = DEPLOY / "grafana" / "teamup-proxy.json"
DOCKERFILE = ROOT / "Dockerfile"
UID = 10001


def load_file(path: Path) -> list[Any]:
    """Every (non-empty) YAML document in `path`."""
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


# --- reading the deploy files ---------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    doc: dict[str, Any] = load_file(K8S / "kustomization.yaml")[0]
    return doc


def k8s_objects() -> list[dict[str, Any]]:
    """Every object of the manifests the kustomization lists, in order."""
    return [doc for name in kustomization()["resources"] for doc in load_file(K8S / name)]


def k8s_object(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o
        for o in k8s_objects()
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def proxy_deployment() -> dict[str, Any]:
    return k8s_object("Deployment", "teamup-proxy")


def proxy_container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = proxy_deployment()["spec"]["template"]["spec"]["containers"]
    (container,) = (c for c in containers if c["name"] == "proxy")
    return container


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def config_values(obj: dict[str, Any]) -> dict[str, str]:
    """The key/value pairs of a ConfigMap or a Secret (`data` of a Secret is base64)."""
    values = {k: str(v) for k, v in obj.get("stringData", {}).items()}
    for key, value in obj.get("data", {}).items():
        values[key] = base64.b64decode(value).decode() if obj["kind"] == "Secret" else str(value)
    return values


def k8s_environment() -> dict[str, str]:
    """The proxy container's PROXY_* variables (ConfigMaps and Secrets of envFrom, then env)."""
    container = proxy_container()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_values(k8s_object("ConfigMap", source["configMapRef"]["name"])))
        if "secretRef" in source:
            env.update(config_values(k8s_object("Secret", source["secretRef"]["name"])))
    for var in container.get("env", []):
        name, source = var["name"], var.get("valueFrom", {})
        if "value" in var:
            env[name] = str(var["value"])
        elif ref := source.get("resourceFieldRef"):
            assert ref["resource"] == "limits.cpu", var
            limit = cpu_cores(container["resources"]["limits"]["cpu"])
            env[name] = str(math.ceil(limit / cpu_cores(ref.get("divisor", "1"))))
        elif ref := source.get("configMapKeyRef"):
            env[name] = config_values(k8s_object("ConfigMap", ref["name"]))[ref["key"]]
        elif ref := source.get("secretKeyRef"):
            env[name] = config_values(k8s_object("Secret", ref["name"]))[ref["key"]]
        else:
            raise AssertionError(f"{name}: a source this test cannot follow: {source}")
    return env


def k8s_secret_files() -> set[str]:
    """Files the proxy container sees in its secrets directory."""
    container = proxy_container()
    secrets_dir = k8s_environment().get("PROXY_SECRETS_DIR", DEFAULT_SECRETS_DIR)
    volumes = {v["name"]: v for v in proxy_deployment()["spec"]["template"]["spec"]["volumes"]}
    files: set[str] = set()
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if mount["mountPath"].rstrip("/") != secrets_dir or "secret" not in volume:
            continue
        if "items" in volume["secret"]:
            files.update(item["path"] for item in volume["secret"]["items"])
        else:
            files.update(config_values(k8s_object("Secret", volume["secret"]["secretName"])))
    return files


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = load_file(COMPOSE)[0]
    return doc


def compose_proxies() -> dict[str, dict[str, Any]]:
    """Services that run the proxy: our image, its entrypoint not overridden."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if str(service.get("image", "")).startswith("teamup-proxy") and "entrypoint" not in service
    }


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def compose_secret_files(service: dict[str, Any]) -> set[str]:
    """Files the service sees in /run/secrets (compose mounts secrets there)."""
    files = set()
    for secret in service.get("secrets", []):
        target = secret if isinstance(secret, str) else secret.get("target", secret["source"])
        if target.startswith("/"):
            if str(Path(target).parent) != DEFAULT_SECRETS_DIR:
                continue
            target = Path(target).name
        files.add(target)
    return files


def setting_names() -> set[str]:
    return {f"PROXY_{name.upper()}" for name in Settings.model_fields}


def required_settings() -> set[str]:
    names = {f"PROXY_{n.upper()}" for n, f in Settings.model_fields.items() if f.is_required()}
    # A credential is required: PROXY_UPSTREAM_TOKEN (the deploy files' choice), or
    # PROXY_UPSTREAMS instead; the check across the two is a model validator, not a field's.
    names.add("PROXY_UPSTREAM_TOKEN")
    assert names, "no required setting: the checks below would prove nothing"
    return names


def make_settings(**values: Any) -> Settings:
    """Settings from `values` and the environment, never from a `.env` file."""
    values["_env_file"] = None
    return Settings(**values)


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the proxy would read them from exactly `env` (plus a token)."""
    for name in [n for n in os.environ if n.startswith("PROXY_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    values: dict[str, Any] = {}
    if "PROXY_UPSTREAM_TOKEN" not in env:
        values["upstream_token"] = "token-from-the-secret-file"
    return make_settings(**values)


def healthcheck_urls(text: str) -> list[tuple[int, str]]:
    """(port, path) of every `http://127.0.0.1:PORT/PATH` in `text`."""
    return [(int(p), path) for p, path in re.findall(r"http://127\.0\.0\.1:(\d+)(/[\w/.-]*)", text)]


def dockerfile_healthcheck() -> tuple[int, str]:
    """(default port, path) of the image's HEALTHCHECK (the port follows PROXY_PORT)."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    (check,) = re.findall(r"(?m)^HEALTHCHECK .*$", text)
    path = re.search(r"http://127\.0\.0\.1:%s(/[\w/.-]*)", check)
    port = re.search(r"environ\.get\('PROXY_PORT', '(\d+)'\)", check)
    assert path is not None and port is not None, check
    return int(port.group(1)), path.group(1)


def app_paths() -> set[str]:
    app = create_app(make_settings(upstream_token="x"))
    return {
        route.resource.canonical
        for route in app.router.routes()
        if route.resource is not None and route.method in ("GET", "*")
    }


# --- settings ---------------------------------------------------------------------------------


def deploy_texts() -> Iterator[tuple[str, str]]:
    yield "Dockerfile", DOCKERFILE.read_text(encoding="utf-8")
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            yield str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")


def test_every_proxy_variable_is_a_setting() -> None:
    known = setting_names() | {"PROXY_SECRETS_DIR"}
    used: dict[str, set[str]] = {}
    for name, text in deploy_texts():
        for var in re.findall(r"(?<![A-Za-z0-9_])PROXY_[A-Z0-9_]+", text):
            used.setdefault(var, set()).add(name)
    assert "PROXY_UPSTREAM_TOKEN" in used
    assert {var: files for var, files in used.items() if var not in known} == {}


def test_compose_provides_every_required_setting() -> None:
    proxies = compose_proxies()
    assert len(proxies) >= 2 or any(
        s.get("deploy", {}).get("replicas", 1) >= 2 for s in proxies.values()
    )
    for name, service in proxies.items():
        provided = set(compose_environment(service)) | compose_secret_files(service)
        assert required_settings() - provided == set(), name
    for secret in compose()["secrets"].values():
        path = COMPOSE.parent / secret["file"]
        assert path.exists() or path.with_name(path.name + ".example").exists(), path


def test_kubernetes_provides_every_required_setting() -> None:
    provided = set(k8s_environment()) | k8s_secret_files()
    assert required_settings() - provided == set()


def test_deploy_settings_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    k8s = settings_from(k8s_environment(), monkeypatch)
    assert k8s.redis_url is not None and k8s.drain_delay == 5
    for service in compose_proxies().values():
        local = settings_from(compose_environment(service), monkeypatch)
        assert local.redis_url is not None and local.replicas_hint == 2
        assert local.clients, "the try-out needs a demo client"


def test_placeholder_token_cannot_start_the_proxy_but_the_demo_token_can() -> None:
    secret = k8s_object("Secret", "teamup-proxy-upstream")
    with pytest.raises(ValidationError, match="upstream_token"):
        make_settings(upstream_token=secret["stringData"]["PROXY_UPSTREAM_TOKEN"])
    demo = (DEPLOY / "secrets" / "upstream_token.example").read_text(encoding="utf-8")
    token = make_settings(upstream_token=demo).default_upstream.token
    assert "not-a-real" in token.get_secret_value()


# --- probes, ports, processes ---------------------------------------------------------------


def test_probe_paths_exist_in_the_router() -> None:
    paths = app_paths()
    container = proxy_container()
    probes = {
        kind: container[kind]["httpGet"]["path"]
        for kind in ("livenessProbe", "readinessProbe", "startupProbe")
    }
    assert probes["livenessProbe"] == "/healthz" and probes["readinessProbe"] == "/readyz"
    annotations = proxy_deployment()["spec"]["template"]["metadata"]["annotations"]
    used = {*probes.values(), annotations["prometheus.io/path"]}
    used.add(dockerfile_healthcheck()[1])
    for service in compose_proxies().values():
        used |= {path for _, path in healthcheck_urls(" ".join(service["healthcheck"]["test"]))}
    assert "/healthz" in used and used <= paths, used - paths


def test_ports_match_the_port_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    port = settings_from(k8s_environment(), monkeypatch).port
    container = proxy_container()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"http": port}
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe_port = container[kind]["httpGet"]["port"]
        assert named.get(probe_port, probe_port) == port
    service_ports = k8s_object("Service", "teamup-proxy")["spec"]["ports"]
    assert all(named.get(p["targetPort"], p["targetPort"]) == port for p in service_ports)
    annotations = proxy_deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    policy = k8s_object("NetworkPolicy", "teamup-proxy")["spec"]
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [port]

    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert re.findall(r"(?m)^EXPOSE\s+(\d+)", dockerfile) == [str(port)]
    assert Settings.model_fields["port"].default == port
    assert dockerfile_healthcheck()[0] == port

    for service in compose_proxies().values():
        local = settings_from(compose_environment(service), monkeypatch).port
        targets = {int(str(p).rsplit(":", 1)[-1]) for p in service["ports"]}
        assert targets == {local}
        assert {p for p, _ in healthcheck_urls(" ".join(service["healthcheck"]["test"]))} == {local}


def test_shutdown_fits_the_grace_period(monkeypatch: pytest.MonkeyPatch) -> None:
    k8s = settings_from(k8s_environment(), monkeypatch)
    grace = proxy_deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert k8s.drain_delay > 0, "endpoints must be removed before the listener closes"
    assert grace > k8s.drain_delay + k8s.shutdown_timeout
    for service in compose_proxies().values():
        local = settings_from(compose_environment(service), monkeypatch)
        stop = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert stop is not None and int(stop.group(1)) > local.drain_delay + local.shutdown_timeout


def test_workers_follow_the_cpu_limit_and_the_replicas_hint_covers_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    container = proxy_container()
    k8s = settings_from(k8s_environment(), monkeypatch)
    assert k8s.workers == math.ceil(cpu_cores(container["resources"]["limits"]["cpu"]))
    hpa = k8s_object("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "teamup-proxy"
    assert hpa["minReplicas"] >= 2 and proxy_deployment()["spec"]["replicas"] >= 2
    assert k8s.replicas_hint == hpa["maxReplicas"] * k8s.workers
    proxies = compose_proxies()
    for service in proxies.values():
        local = settings_from(compose_environment(service), monkeypatch)
        assert local.replicas_hint == len(proxies) * local.workers


def test_kubernetes_pod_is_locked_down() -> None:
    pod = proxy_deployment()["spec"]["template"]["spec"]
    container = proxy_container()
    context = {**pod["securityContext"], **container["securityContext"]}
    assert context["runAsNonRoot"] is True and context["runAsUser"] == UID
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"]
    # The service-account token would be mounted inside the read-only /run/secrets volume.
    assert pod["automountServiceAccountToken"] is False
    assert re.search(rf"(?m)^USER {UID}(:{UID})?$", DOCKERFILE.read_text(encoding="utf-8"))


def test_dockerfile_runs_the_console_script() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    entrypoint = re.findall(r"(?m)^ENTRYPOINT (\[.*\])$", dockerfile)
    cmd = re.findall(r"(?m)^CMD (\[.*\])$", dockerfile)
    assert [json.loads(e) for e in entrypoint] == [["teamup-proxy"]]
    assert "teamup-proxy" in project["scripts"]
    assert [json.loads(c) for c in cmd] == [["serve"]]


def test_kustomization_lists_every_manifest() -> None:
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization()["resources"]) == sorted(on_disk)
    kinds = {o["kind"] for o in k8s_objects()}
    assert kinds >= {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "StatefulSet",
    }


# --- dashboard ----------------------------------------------------------------------------------


def exported_series() -> dict[str, str]:
    """Every series name the registry can export -> the metric family it belongs to."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gauge": ("",),
    }
    series: dict[str, str] = {}
    for family in Metrics().registry.collect():
        for suffix in suffixes[family.type]:
            series[family.name + suffix] = family.name
    return series


def dashboard_exprs() -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return list(walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))))


def test_dashboard_metrics_exist_and_cover_the_registry() -> None:
    series = exported_series()
    used = {name for expr in dashboard_exprs() for name in re.findall(r"\bteamup_proxy_\w+", expr)}
    assert used, "no metric in the dashboard"
    assert used - set(series) == set()
    without_panel = set(series.values()) - {series[name] for name in used}
    assert without_panel == set()
