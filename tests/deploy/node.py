"""What the tests of deploy/ share: the manifests read as data, and a real node run as a pod would.

``start_node`` runs ``tafe`` with the Deployment's arguments and the ConfigMap's tafe.toml,
verbatim; only what a pod gets from its volumes and its network differs, and is set the
way a pod's environment would (``TAFE_*`` variables beat the file): paths into a temporary
directory, and 127.0.0.1 with free ports.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml
from test_master import Proc
from test_up import UP_RE, free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def manifests() -> dict[str, dict[str, Any]]:
    """Every resource in deploy/k8s, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[doc["kind"]] = doc
    return found


def tafe_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "tafe"]
    return container


def toml_settings() -> dict[str, Any]:
    return tomllib.loads(manifests()["ConfigMap"]["data"]["tafe.toml"])["tafe"]


def start_node(tmp: Path, **env: str) -> tuple[Proc, re.Match[str]]:
    """``tafe up`` as the pod runs it; the match of its "up:" line (public, nginx pid, workers, admin)."""
    data = manifests()["ConfigMap"]["data"]
    (tmp / "tafe.toml").write_text(data["tafe.toml"])
    (tmp / "campaigns.json").write_text(data["campaigns.json"])
    (tmp / "models").mkdir()
    container = tafe_container(manifests()["Deployment"])
    pod_env = {
        "TAFE_CONFIG": str(tmp / "tafe.toml"),
        "TAFE_CAMPAIGNS": str(tmp / "campaigns.json"),
        "TAFE_WATCH_DIR": str(tmp / "models"),
        "TAFE_RUN_DIR": str(tmp / "run"),
        "TAFE_HOST": "127.0.0.1",
        "TAFE_PORT": str(free_port()),
        "TAFE_ADMIN_HOST": "127.0.0.1",
        "TAFE_ADMIN_PORT": "0",
        "TAFE_NOTICE_KEYS": "k1:deploy-test-secret-0123456789",
        "TAFE_STATE": "",  # the embedded state: the ConfigMap's Redis is a fleet's
        **env,
    }
    assert {e["name"] for e in container["env"]} >= {"TAFE_CONFIG", "TAFE_NOTICE_KEYS"}
    proc = Proc(*container["args"], env=pod_env)
    return proc, proc.wait_for(UP_RE, timeout=60)

