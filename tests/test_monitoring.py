"""Monitoring files (monitoring/, k8s/components/monitoring/, compose's `monitoring` profile),
checked offline against the metrics the service really exports.

1. promtool (Prometheus's own checker, from Debian's `prometheus` package; scripts/install.sh
   puts it in the venv): `check rules` on the alert rules, `test rules` on their unit tests,
   `check config` on the compose Prometheus config, `check metrics` on a real /metrics scrape,
   and `check rules` on every dashboard query (wrapped as recording rules: PromQL's own parser).
2. Every `gpm_*` selector in the rules, their unit-test series and the dashboard names a series
   that a running app (fake model) really exports, with label names it carries and label values
   the service uses: a renamed metric, label, stage or error code fails here.
3. The Grafana dashboard's structure (Grafana's JSON model: ids, grid, targets, the datasource
   variable) and that it plots every gpm_* metric family.
4. The compose profile renders and mounts what Prometheus and Grafana are configured to read.
5. The kustomize component renders inside both overlays; built-in kinds validate with
   kubernetes-validate, and ServiceMonitor/PrometheusRule, which are CRDs its schemas lack, are
   parsed by models generated from the prometheus-operator CRDs (cloudcoil, v0.80), with a
   round trip that rejects fields the models do not know.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from apptools import serve
from fakes import FakeBackend
from prometheus_client.parser import text_string_to_metric_families
from test_deploy import K8S_VERSION, _compose_command, _kustomize_command

from gpm_server.metrics import ROUTES, Metrics

ROOT = Path(__file__).resolve().parents[1]
MON = ROOT / "monitoring"
RULES = MON / "gpm-alerts.yaml"
RULE_TESTS = MON / "gpm-alerts.test.yaml"
DASHBOARD = MON / "gpm-dashboard.json"
PROM_CONFIG = MON / "prometheus.yml"
COMPONENT = ROOT / "k8s" / "components" / "monitoring"
COMPOSE = ROOT / "docker" / "compose.yaml"
# Labels Prometheus adds at scrape time, not the service.
TARGET_LABELS = {"job", "instance"}
# Grafana's variables, replaced before PromQL parsing.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$job": "gpm"}

_SELECTOR = re.compile(r"(?<![\w:$])(gpm_\w+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _promtool() -> str:
    local = Path(sys.executable).parent / "promtool"
    found = str(local) if local.is_file() else shutil.which("promtool")
    if found is None:
        pytest.skip("no promtool: scripts/install.sh unpacks it from Debian's prometheus package")
    return found


def _promtool_ok(*args: str, stdin: str | None = None, cwd: Path = MON) -> str:
    run = subprocess.run(
        [_promtool(), *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}\n{run.stderr}"
    return run.stdout


# --------------------------------------------------------------------------------------------
# What the service exports: a real app (fake model) after a few requests, scraped.
# --------------------------------------------------------------------------------------------


async def _scrape() -> str:
    auth = {"Authorization": "Bearer k"}
    async with serve(FakeBackend(), api_key="k") as (_, client):
        ok = await client.post(
            "/score", json={"groups": [{"prompt": "p", "responses": ["a", "b"]}]}, headers=auth
        )
        assert ok.status_code == 200
        assert (await client.post("/score", json={"groups": []}, headers=auth)).status_code == 422
        assert (await client.post("/score", json={})).status_code == 401
        return (await client.get("/metrics")).text


@pytest.fixture(scope="module")
def exposition() -> str:
    return asyncio.run(_scrape())


@pytest.fixture(scope="module")
def exported(exposition: str) -> dict[str, dict[str, set[str]]]:
    """Sample name → label name → the values seen (`le` included for buckets)."""
    out: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = out.setdefault(sample.name, {})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return out


def _service_codes() -> str:
    return "".join(p.read_text() for p in (ROOT / "gpm_server").rglob("*.py"))


def _selector_problems(expr: str, exported: dict[str, dict[str, set[str]]]) -> list[str]:
    """What in `expr`'s gpm_* selectors the service does not export (empty: all real)."""
    problems = []
    source = None
    for name, braces in _SELECTOR.findall(expr):
        if name not in exported:
            problems.append(f"{name}: no such series")
            continue
        for label, op, value in _MATCHER.findall(braces or ""):
            if label in TARGET_LABELS:
                continue
            if label not in exported[name]:
                problems.append(f"{name}: no label {label!r}")
                continue
            if label == "status" or "$" in value:
                continue  # HTTP status patterns; Grafana variables
            alternatives = value.split("|") if op in ("=~", "!~") else [value]
            if any(re.search(r"[.*+?()\[\]]", a) for a in alternatives):
                continue  # a real regex, not a list of values
            if label == "reason":
                source = source or _service_codes()
                known = {a for a in alternatives if f'"{a}"' in source}
            elif label == "route":
                known = set(alternatives) & set(ROUTES)
            else:
                known = set(alternatives) & exported[name][label]
            problems += [
                f"{name}: {label}={a!r} is never exported" for a in alternatives if a not in known
            ]
    return problems


def _rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _rule_test_series() -> list[str]:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    return [s["series"] for t in tests for s in t["input_series"]]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


# --------------------------------------------------------------------------------------------
# 1. promtool
# --------------------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    assert "SUCCESS: 5 rules found" in _promtool_ok("check", "rules", RULES.name)
    out = _promtool_ok("test", "rules", RULE_TESTS.name)
    assert "SUCCESS" in out
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = {
        case["alertname"]
        for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in t["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == alerts, f"alerts never shown to fire in a unit test: {alerts - tested}"


def test_compose_prometheus_config_passes_promtool() -> None:
    _promtool_ok("check", "config", PROM_CONFIG.name)


def test_real_metrics_pass_promtool_lint(exposition: str) -> None:
    _promtool_ok("check", "metrics", stdin=exposition)


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(_dashboard_exprs()):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unhandled Grafana variable in {expr}"
        rules.append({"record": f"gpm_dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in _promtool_ok("check", "rules", str(path))


# --------------------------------------------------------------------------------------------
# 2. Names and labels against the real exposition
# --------------------------------------------------------------------------------------------


def test_ready_gauge_follows_the_lifespan(exposition: str) -> None:
    """GPMNotReady reads gpm_ready: 0 in a new registry, 1 once the app is ready."""
    assert Metrics().registry.get_sample_value("gpm_ready") == 0
    assert re.search(r"^gpm_ready 1\.0$", exposition, re.MULTILINE)


def test_every_selector_names_a_real_series(exported: dict[str, dict[str, set[str]]]) -> None:
    for expr in _rule_exprs() + _rule_test_series() + _dashboard_exprs():
        assert _SELECTOR.search(expr) or expr.startswith("up"), f"no gpm_* series in {expr}"
        assert _selector_problems(expr, exported) == [], expr


@pytest.mark.parametrize(
    "expr",
    [
        "rate(gpm_request_total[5m])",  # renamed metric
        'gpm_requests_total{path="/score"}',  # renamed label
        'gpm_stage_seconds_bucket{stage="decode"}',  # a stage the service never times
        'gpm_errors_total{reason=~"queue_full|queue_overflow"}',  # an error code nobody raises
        'gpm_requests_total{route="/v1/score"}',  # a route label the service never uses
    ],
)
def test_selector_check_catches_a_rename(
    exported: dict[str, dict[str, set[str]]], expr: str
) -> None:
    assert _selector_problems(expr, exported)


# --------------------------------------------------------------------------------------------
# 3. Grafana dashboard
# --------------------------------------------------------------------------------------------


def test_dashboard_structure_and_coverage() -> None:
    dash = _dashboard()
    assert isinstance(dash["schemaVersion"], int) and dash["uid"] and dash["title"]
    assert "id" not in dash or dash["id"] is None, "a fixed id collides on import"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    provisioned = yaml.safe_load((MON / "grafana" / "datasource.yaml").read_text())
    assert variables["datasource"]["current"]["value"] in {
        d["uid"] for d in provisioned["datasources"] if d["type"] == "prometheus"
    }
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in "xywh"), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table"}
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets), panel["title"]
        assert all(t["expr"].strip() for t in targets), panel["title"]
    # every metric family of gpm_server/metrics.py is on the dashboard
    used = " ".join(_dashboard_exprs())
    families = {family.name for family in Metrics().registry.collect()}
    missing = {f for f in families if not re.search(rf"\b{f}(_total|_bucket|_sum|_count)?\b", used)}
    assert not missing, f"metrics with no panel: {missing}"


# --------------------------------------------------------------------------------------------
# 4. docker compose profile
# --------------------------------------------------------------------------------------------


def _compose(tmp_path: Path, *profile: str) -> dict[str, Any]:
    cmd, env = _compose_command(tmp_path)
    run = subprocess.run(
        [*cmd, "-f", str(COMPOSE), *profile, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_compose_monitoring_profile_mounts_what_it_configures(tmp_path: Path) -> None:
    assert not {"prometheus", "grafana"} & set(_compose(tmp_path)["services"]), "opt-in only"
    services = _compose(tmp_path / "p", "--profile", "monitoring")["services"]
    mounts = {
        name: {v["target"]: Path(v["source"]) for v in s.get("volumes", []) if v["type"] == "bind"}
        for name, s in services.items()
    }
    prom = mounts["prometheus"]
    assert prom["/etc/prometheus/prometheus.yml"] == PROM_CONFIG
    config = yaml.safe_load(PROM_CONFIG.read_text())
    for rule_file in config["rule_files"]:  # relative to the config file, here and in the container
        assert prom[f"/etc/prometheus/{rule_file}"] == MON / rule_file
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services and job["metrics_path"] in ROUTES
    assert port == str(services["gpm"]["environment"].get("GPM_PORT", 8000))
    assert {p["target"] for p in services["gpm"]["ports"]} == {int(port)}
    grafana = mounts["grafana"]
    datasources = yaml.safe_load((MON / "grafana" / "datasource.yaml").read_text())["datasources"]
    assert (
        datasources[0]["url"] == f"http://prometheus:{services['prometheus']['ports'][0]['target']}"
    )
    provider = yaml.safe_load((MON / "grafana" / "dashboards.yaml").read_text())["providers"][0]
    dashboards = {t: s for t, s in grafana.items() if s == DASHBOARD}
    (target_path,) = dashboards
    assert str(Path(target_path).parent) == provider["options"]["path"]
    provisioning = {s.name: t for t, s in grafana.items()}
    assert provisioning["datasource.yaml"].startswith("/etc/grafana/provisioning/datasources/")
    assert provisioning["dashboards.yaml"].startswith("/etc/grafana/provisioning/dashboards/")


# --------------------------------------------------------------------------------------------
# 5. Kubernetes component
# --------------------------------------------------------------------------------------------


def _render_with_component(tmp_path: Path, overlay: str) -> list[dict[str, Any]]:
    """Render an overlay with the component added the documented way (`components:`)."""
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    kustomization = tmp_path / "k8s" / "overlays" / overlay / "kustomization.yaml"
    doc = yaml.safe_load(kustomization.read_text())
    doc["components"] = ["../../components/monitoring"]
    kustomization.write_text(yaml.safe_dump(doc))
    run = subprocess.run(
        [*_kustomize_command(), str(kustomization.parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return [d for d in yaml.safe_load_all(run.stdout) if d]


def _crd_problems(doc: dict[str, Any]) -> list[str]:
    """Parse with the CRD's generated model; fields the model drops on the way are unknown."""
    models = pytest.importorskip(
        "cloudcoil.models.prometheus_operator.v1", reason="dev extra: cloudcoil models"
    )
    parsed = getattr(models, doc["kind"]).model_validate(doc)
    back = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")

    def dropped(a: Any, b: Any, path: str) -> list[str]:
        out = []
        if isinstance(a, dict):
            for key, value in a.items():
                out += dropped(value, b[key], f"{path}.{key}") if key in b else [f"{path}.{key}"]
        elif isinstance(a, list):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                out += dropped(x, y, f"{path}[{i}]")
        return out

    return dropped(doc, back, doc["kind"])


def test_crd_check_rejects_an_unknown_field() -> None:
    doc = yaml.safe_load((COMPONENT / "servicemonitor.yaml").read_text())
    assert _crd_problems(doc) == []
    doc["spec"]["endpoints"][0]["pathh"] = doc["spec"]["endpoints"][0].pop("path")
    assert _crd_problems(doc) == ["ServiceMonitor.spec.endpoints[0].pathh"]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kustomize_component_scrapes_each_pod_once_and_carries_the_rules(
    tmp_path: Path, overlay: str
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _render_with_component(tmp_path, overlay)
    crds = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    assert sorted(d["kind"] for d in crds) == ["PrometheusRule", "ServiceMonitor"]
    for doc in docs:
        if doc in crds:
            assert _crd_problems(doc) == [], doc["kind"]
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    namespace = deployment["metadata"]["namespace"]
    assert all(d["metadata"]["namespace"] == namespace for d in crds)

    (monitor,) = [d for d in crds if d["kind"] == "ServiceMonitor"]
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    selected = [
        d for d in docs if d["kind"] == "Service" and wanted <= d["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["gpm-server"], "each pod scraped once"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] in ROUTES
    port = next(p for p in selected[0]["spec"]["ports"] if p["name"] == endpoint["port"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}

    (rule,) = [d for d in crds if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), (
        "k8s/components/monitoring/prometheusrule.yaml's spec.groups must equal "
        "monitoring/gpm-alerts.yaml's groups"
    )
