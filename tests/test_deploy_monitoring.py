"""The shipped monitoring: Prometheus alert rules (deploy/prometheus/alerts.yml) and the Grafana
dashboard (deploy/grafana/gateway.json).

- `promtool check rules` and `promtool test rules` (deploy/prometheus/alerts_test.yml: each alert fires
  when it should and stays quiet otherwise); skipped, with the reason, where promtool is not installed
  (.ci/run installs Debian's prometheus package, which ships it, when it runs as root with apt);
- every metric the rules and the dashboard query is one a running gateway really exposes (a renamed
  metric breaks this test, not a 3 a.m. page), and every dashboard query is valid PromQL (promtool
  checks them as recording rules).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "gateway.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="no promtool (apt-get install prometheus ships it)")

#: series Prometheus makes itself
PROMETHEUS_OWN = frozenset({"up"})
METRIC_NAME = re.compile(r"\b((?:gateway|process)_[a-z0-9_]+)\b")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def exposed_series_names() -> set[str]:
    """The sample names a scrape of a gateway can contain (labelled families included before their
    first sample)."""
    names = set()
    for family in Metrics().registry.collect():
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
        elif family.type == "counter":
            names |= {f"{family.name}_total", family.name}
        else:
            names.add(family.name)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def alert_expressions() -> list[str]:
    # the rules file is YAML; its expressions are the `expr:` values (single line or a >- block)
    text = ALERTS.read_text(encoding="utf-8")
    exprs, current = [], None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("expr:"):
            value = stripped[len("expr:"):].strip()
            if value == ">-":
                current = []
                exprs.append(current)
            else:
                exprs.append([value])
                current = None
        elif current is not None:
            if stripped and not re.match(r"^\w+:", stripped):
                current.append(stripped)
            else:
                current = None
    return [" ".join(parts) for parts in exprs]


@needs_promtool
def test_promtool_checks_the_alert_rules():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_alert_rules_pass():
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path: Path):
    """The rule tests are not vacuous: a wrong expectation makes promtool fail."""
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    broken = ALERTS_TEST.read_text(encoding="utf-8").replace("2 reversal(s) parked", "3 reversal(s) parked")
    (tmp_path / ALERTS_TEST.name).write_text(broken, encoding="utf-8")
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert result.returncode != 0 and "GatewayReversalsParked" in result.stdout + result.stderr


def test_alert_rules_name_only_metrics_the_gateway_exposes():
    exprs = alert_expressions()
    assert len(exprs) == 6
    exposed = exposed_series_names() | PROMETHEUS_OWN
    for expr in exprs:
        used = set(METRIC_NAME.findall(expr)) | ({"up"} if re.search(r"\bup\{", expr) else set())
        assert used, expr
        assert used <= exposed, (expr, used - exposed)


def test_dashboard_queries_name_only_metrics_the_gateway_exposes():
    queries = dashboard_queries()
    assert len(queries) >= 20
    exposed = exposed_series_names()
    used = {name for q in queries for name in METRIC_NAME.findall(q)}
    assert used <= exposed, used - exposed
    # what an operator needs first is on the dashboard
    for needed in ("gateway_host_link_state", "gateway_saf_parked", "gateway_saf_oldest_pending_age_seconds",
                   "gateway_journal_ready", "gateway_stage_seconds_bucket", "gateway_end_to_end_latency_seconds_count",
                   "gateway_signed_in_terminals", "gateway_build_info"):
        assert needed in used, needed


def test_dashboard_layout_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]  # no hard-wired datasource
            assert 'instance=~"$instance"' in target["expr"], panel["title"]


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path):
    """promtool parses every dashboard query (as a recording rule; Grafana's variables filled in)."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, query in enumerate(dashboard_queries()):
        expr = query.replace("$__rate_interval", "5m").replace("$instance", ".*")
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard_rules.yml"
    rules.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
