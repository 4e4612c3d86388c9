"""deploy/k8s: the manifests validate offline, their numbers agree with TAFE's settings, and a
node started exactly as the Deployment starts it drains within the pod's grace period."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_master import request

from tafe import nginx as nginx_mod
from tafe import settings as tafe_settings
from tafe.core import load_campaigns
from tafe.up import nginx_budget_s

from .node import K8S, ROOT, manifests, start_node, tafe_container, toml_settings

VALIDATE = Path(sys.executable).with_name("kubernetes-validate")
# The oldest Kubernetes with native sidecars (init containers with restartPolicy: Always), and the newest schemas shipped.
VERSIONS = ("1.29.0", "1.37.0")


def validate(*paths: Path, version: str) -> subprocess.CompletedProcess[str]:
    if not VALIDATE.exists():
        pytest.skip("kubernetes-validate not installed (the dev extra installs it)")
    cmd = [str(VALIDATE), "--strict", "--quiet", "-k", version, *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_strictly(version: str):
    files = sorted(K8S.glob("*.yaml"))
    assert {p.name for p in files} >= {"deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml", "configmap.yaml", "secret.yaml"}
    out = validate(*files, version=version)
    assert out.returncode == 0, out.stdout + out.stderr


def test_strict_validation_refuses_a_misspelt_field(tmp_path: Path):
    bad = tmp_path / "deployment.yaml"
    bad.write_text((K8S / "deployment.yaml").read_text().replace("terminationGracePeriodSeconds", "terminationGracePeriodSecond"))
    out = validate(bad, version=VERSIONS[-1])
    assert out.returncode != 0 and "terminationGracePeriodSecond" in out.stdout + out.stderr


def _pod_numbers() -> tuple[dict, float, float]:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    container = tafe_container(manifests()["Deployment"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    return container, float(pre_stop[1]), float(pod["terminationGracePeriodSeconds"])


def configmap_settings(tmp: Path) -> tafe_settings.Settings:
    """The ConfigMap's tafe.toml as TAFE reads it, through its own rules."""
    (tmp / "tafe.toml").write_text(manifests()["ConfigMap"]["data"]["tafe.toml"])
    return tafe_settings.load(tmp / "tafe.toml", environ={})


def test_grace_period_covers_prestop_and_tafes_whole_drain(tmp_path: Path):
    s = configmap_settings(tmp_path)
    container, pre_stop_s, grace_s = _pod_numbers()
    # What `tafe up` allows itself before it kills its own children (tafe/up.py, Node.stop).
    up_worst_s = s.drain_grace_s + nginx_budget_s(s) + s.drain_timeout_s + 15
    assert pre_stop_s + up_worst_s <= grace_s, (
        f"preStop {pre_stop_s:g} s + tafe up's longest stop {up_worst_s:g} s = {pre_stop_s + up_worst_s:g} s"
        f" > terminationGracePeriodSeconds {grace_s:g}"
    )
    # The drain's 503s on /ping must take the pod out of the Service, not get it restarted.
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"]["path"] == liveness["httpGet"]["path"] == "/ping"
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < s.drain_grace_s
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > s.drain_grace_s + nginx_budget_s(s) + s.drain_timeout_s


def test_ports_workers_and_secrets_agree_with_the_settings():
    s, container = toml_settings(), tafe_container(manifests()["Deployment"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": s["port"], "admin": s["admin-port"]}
    annotations = manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(s["admin-port"])
    assert manifests()["Service"]["spec"]["ports"][0]["targetPort"] == "http"  # never the admin port
    # One worker per requested CPU: workers = 0 would count the whole machine's cores.
    assert s["workers"] == int(container["resources"]["requests"]["cpu"])
    env = {e["name"]: e for e in container["env"]}
    assert env["TAFE_NOTICE_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == manifests()["Secret"]["metadata"]["name"]
    assert env["TAFE_STATE"]["valueFrom"]["configMapKeyRef"]["key"] in manifests()["ConfigMap"]["data"]
    assert "notice-keys" not in s and "notice_keys" not in s  # the secret never sits in the ConfigMap
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert s["watch-dir"] in mounts and s["campaigns"].startswith("/etc/tafe/") and "/etc/tafe" in mounts


def test_configmap_campaigns_are_valid(tmp_path: Path):
    s = configmap_settings(tmp_path)
    (tmp_path / "campaigns.json").write_text(manifests()["ConfigMap"]["data"]["campaigns.json"])
    assert load_campaigns(str(tmp_path / "campaigns.json"), seat=s.seat, currency=s.currency)


@pytest.mark.nginx
@pytest.mark.skipif(nginx_mod.find_binary(tafe_settings.Settings()) is None, reason="nginx not installed (.ci/run installs it)")
def test_node_started_as_the_pod_answers_its_probes_and_drains_within_the_grace(tmp_path: Path):
    container, pre_stop_s, grace_s = _pod_numbers()
    probe = container["readinessProbe"]["httpGet"]
    proc, up = start_node(tmp_path)
    try:
        url = up.group(1)
        assert request(url, path=probe["path"])[0] == 200
        stopped_at = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        # Out of the Service within one probe period: /ping answers 503 at once.
        deadline = stopped_at + container["readinessProbe"]["periodSeconds"]
        while (status := request(url, path=probe["path"])[0]) == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 503
        assert proc.proc.wait(timeout=grace_s - pre_stop_s) == 0, proc.output()[-3000:]
        assert time.monotonic() - stopped_at < grace_s - pre_stop_s
    finally:
        proc.stop(signal.SIGKILL)
        shutil.rmtree(tmp_path / "run", ignore_errors=True)


def test_dockerfile_agrees_with_the_pod():
    """The image cannot be built here (no container runtime): what the pod relies on is read from it."""
    lines = [line.split(None, 1) for line in (ROOT / "Dockerfile").read_text().splitlines() if line and not line.startswith(("#", " "))]
    instructions = {word: rest for word, rest in lines}
    assert instructions["FROM"] == "python:3.11-slim"
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    container = tafe_container(manifests()["Deployment"])
    assert instructions["USER"] == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert set(map(int, instructions["EXPOSE"].split())) == {p["containerPort"] for p in container["ports"]}
    assert json.loads(instructions["ENTRYPOINT"]) == ["tafe"] and container["args"][0] == "up"
    text = (ROOT / "Dockerfile").read_text()
    assert "install -y --no-install-recommends nginx" in text and "pip install --no-cache-dir /src" in text
