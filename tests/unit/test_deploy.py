"""deploy/ checked offline with the tools each piece has: systemd-analyze for the unit,
the Kubernetes schemas for the manifests, promtool for the rules and their unit tests,
and the dashboard's queries parsed by promtool and checked against what sockwatch
really exports."""

from __future__ import annotations

import json
import os
import re
import subprocess

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from tests.unit.test_metrics import registry

DEPLOY = os.path.join(ROOT, "deploy")
UNIT = os.path.join(DEPLOY, "systemd", "sockwatch.service")
MANIFEST = os.path.join(DEPLOY, "kubernetes", "sockwatch.yaml")
RULES = os.path.join(DEPLOY, "prometheus", "sockwatch-rules.yml")
DASHBOARD = os.path.join(DEPLOY, "grafana", "sockwatch.json")
NOT_OURS = {"up"}  # Prometheus's own series


def sh(*cmd: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=cwd)


def exported_names() -> set[str]:
    """Every series name sockwatch's collector writes (each family, with data in it)."""
    text = generate_latest(registry()).decode()
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(sockwatch_[a-z_]+|up)\b", expr))


def unit_capabilities() -> list[str]:
    with open(UNIT) as f:
        line = next(x for x in f if x.startswith("CapabilityBoundingSet="))
    return [c.removeprefix("CAP_") for c in line.split("=", 1)[1].split()]


# ---- systemd ---------------------------------------------------------------------------------


def installed_unit(tmp_path) -> str:
    """The unit as it would run from this checkout (verify checks that ExecStart exists)."""
    text = open(UNIT).read().replace("/opt/sockwatch", ROOT)
    path = tmp_path / "sockwatch.service"
    path.write_text(text)
    return str(path)


def test_the_unit_verifies(tmp_path):
    r = sh("systemd-analyze", "verify", installed_unit(tmp_path))
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_the_unit_is_hardened(tmp_path):
    r = sh("systemd-analyze", "security", "--offline=yes", installed_unit(tmp_path))
    level = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert level is not None, r.stdout + r.stderr
    exposure = float(level.group(1))
    assert exposure <= 4.0, r.stdout[-2000:]  # "OK" in systemd's scale; an unhardened root unit scores 9.6
    text = open(UNIT).read()
    for line in ("ProtectSystem=strict", "PrivateTmp=yes", "NoNewPrivileges=yes", "ProtectHome=yes"):
        assert f"\n{line}\n" in text
    assert "CAP_SYS_MODULE" not in text and "AmbientCapabilities=\n" in text


# ---- Kubernetes ------------------------------------------------------------------------------


def manifests() -> dict[str, dict]:
    with open(MANIFEST) as f:
        return {d["kind"]: d for d in yaml.safe_load_all(f)}


@pytest.mark.parametrize("kind", ["Namespace", "ServiceAccount", "DaemonSet", "Service", "NetworkPolicy"])
def test_manifests_validate_against_the_kubernetes_schemas(kind):
    kubernetes_validate.validate(manifests()[kind], kubernetes_validate.latest_version(), strict=True)


def test_a_schema_error_is_caught():
    ds = manifests()["DaemonSet"]
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, kubernetes_validate.latest_version(), strict=True)


def test_the_daemonset_asks_for_what_the_agent_needs_and_no_more():
    m = manifests()
    pod = m["DaemonSet"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    sc = c["securityContext"]
    assert pod["hostPID"] and not pod.get("hostNetwork") and not sc["privileged"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["capabilities"]["add"] == unit_capabilities()  # one list, two deployments
    mounts = {v["mountPath"]: v for v in c["volumeMounts"]}
    assert mounts["/host/sys/fs/cgroup"]["readOnly"] and mounts["/host/var/log"]["readOnly"]
    assert not any(v.get("hostPath", {}).get("path") in ("/", "/proc", "/sys", "/var/run/docker.sock")
                   for v in pod["volumes"])  # fmt: skip
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["SOCKWATCH_LISTEN"].endswith(":9847") and env["SOCKWATCH_KUBELET_LOG_DIR"] == "/host/var/log"
    assert env["SOCKWATCH_CGROUP_ROOT"] == "/host/sys/fs/cgroup"  # not the pod's own cgroup
    assert not pod["automountServiceAccountToken"]  # it never calls the API server


def test_only_prometheus_reaches_the_metrics_on_the_pod_network():
    """The deliberate default: the metrics name every namespace's listeners and their
    processes, so the shipped policy admits Prometheus's pods to that port and nothing else."""
    m = manifests()
    np, ds = m["NetworkPolicy"], m["DaemonSet"]
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert np["spec"]["policyTypes"] == ["Ingress"] and len(np["spec"]["ingress"]) == 1
    (rule,) = np["spec"]["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert [f["podSelector"]["matchLabels"] for f in rule["from"]] == [{"app.kubernetes.io/name": "prometheus"}]
    assert "ipBlock" not in str(rule)  # no address range opened beside it
    ports = {p["name"] for p in ds["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert "metrics" in ports


def test_the_service_monitor_scrapes_the_service():
    m = manifests()
    svc, sm = m["Service"], m["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    assert all(e["port"] in port_names and e["path"] == "/metrics" for e in sm["spec"]["endpoints"])
    container_ports = {p["name"] for p in m["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports


def test_the_image_recipe_copies_what_exists():
    with open(os.path.join(DEPLOY, "container", "Containerfile")) as f:
        lines = f.read().splitlines()
    assert lines[next(i for i, x in enumerate(lines) if x.startswith("FROM"))].startswith("FROM debian:")
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert os.path.exists(os.path.join(ROOT, src)), src
    assert any("scripts/install.sh" in x for x in lines if x.startswith("RUN "))
    assert os.access(os.path.join(DEPLOY, "container", "entrypoint.sh"), os.X_OK)


# ---- Prometheus rules and the dashboard --------------------------------------------------


def test_rules_check_and_pass_their_unit_tests():
    r = sh("promtool", "check", "rules", RULES)
    assert r.returncode == 0, r.stdout + r.stderr
    r = sh("promtool", "test", "rules", "sockwatch-rules.test.yml", cwd=os.path.dirname(RULES))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def dashboard_exprs() -> list[str]:
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def test_rules_and_dashboard_refer_only_to_exported_metrics():
    exported = exported_names() | NOT_OURS
    rules = yaml.safe_load(open(RULES))
    rule_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    for expr in rule_exprs + dashboard_exprs():
        assert metric_names(expr), expr
        assert metric_names(expr) <= exported, (expr, metric_names(expr) - exported)


def test_every_dashboard_query_parses(tmp_path):
    """promtool parses each query as a recording rule (Grafana's variables filled in)."""
    exprs = [e.replace("$__rate_interval", "5m").replace("$instance", ".*") for e in dashboard_exprs()]
    exprs = [re.sub(r"^label_values\((\w+), *\w+\)$", r"\1", e) for e in exprs]  # Grafana's own function
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = sh("promtool", "check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_misspelt_metric_is_caught():
    assert metric_names("rate(sockwatch_bind_failure_total[5m])") - exported_names()
