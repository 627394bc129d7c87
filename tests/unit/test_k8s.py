"""deploy/k8s/: every manifest is a valid object of its kind for the ``kubernetes`` client's
models (a field the models do not know is lost on the round trip and fails here), and the
runner DaemonSet has what docs/CLUSTER.md promises. No cluster runs in the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
    ("v1", "ConfigMap"): "V1ConfigMap",
}


def load() -> dict[str, Any]:
    """Every manifest as its model object, by kind (each checked to survive a round trip)."""
    client = ApiClient()
    objects: dict[str, Any] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            model = MODELS.get((doc["apiVersion"], doc["kind"]))
            assert model, f"{path.name}: no model for {doc['apiVersion']} {doc['kind']}"
            obj = client.deserialize(json.dumps(doc), model, "application/json")  # as if a server sent it
            assert client.sanitize_for_serialization(obj) == doc, f"{path.name}: a field the {model} model lacks"
            objects[doc["kind"]] = obj
    return objects


@pytest.fixture(scope="module")
def runner() -> Any:
    return load()["DaemonSet"]


def test_manifests_load_as_models() -> None:
    assert set(load()) == {"Namespace", "DaemonSet", "ConfigMap"}


def test_runner_serves_with_kvm_token_and_state(runner: Any) -> None:
    spec = runner.spec.template.spec
    (c,) = spec.containers
    assert runner.metadata.namespace == "boxvm"
    assert c.command == ["boxvm", "serve"] and "--host=0.0.0.0" in c.args
    assert any(a.startswith("--tls-cert=") for a in c.args) and any(a.startswith("--tls-key=") for a in c.args)
    env = {e.name: e for e in c.env}
    assert env["BOXVM_TOKEN"].value_from.secret_key_ref.name == "boxvm-token"  # from a Secret, not argv
    assert not any("token" in a for a in c.args)
    assert not env["BOXVM_TOKEN"].value_from.secret_key_ref.optional
    volumes = {v.name: v for v in spec.volumes}
    mounts = {m.name: m.mount_path for m in c.volume_mounts}
    assert volumes["kvm"].host_path.path == "/dev/kvm" and volumes["kvm"].host_path.type == "CharDevice"
    assert mounts["kvm"] == "/dev/kvm"
    assert volumes["state"].host_path.type == "DirectoryOrCreate"
    assert mounts["state"] == env["BOXVM_HOME"].value
    terms = spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution.node_selector_terms
    assert {e.key for t in terms for e in t.match_expressions} >= {"boxvm.dev/kvm"}
    assert c.ports[0].container_port == 8100 and c.readiness_probe.tcp_socket.port == "rest"
    assert spec.automount_service_account_token is False
