"""The alert rules (deploy/prometheus) and the dashboard (deploy/grafana) read real metrics.

Expressions are parsed with promql-parser (a port of Prometheus' parser; promtool is not
available offline) and every metric name they select must be exported by one of: the served
model (a real TorchServe ``/metrics`` scrape, fixture ``served_metrics_text``), the training
process (brst.train.fit.prometheus_gauges, exposed with prometheus-client), a cohort shard
(brst.train.cohort.metrics) or a named cluster exporter
(k8s_checks.EXTERNAL_METRICS).
"""
from __future__ import annotations

import k8s_checks as k8s
import promql_parser
import pytest
from prometheus_client import generate_latest


def rules() -> list[dict]:
    return k8s.alert_rules(k8s.load_yaml_file(k8s.ALERT_RULES))


def rule_queries() -> list[tuple[str, str]]:
    return [(rule.get("alert") or rule["record"], rule["expr"]) for rule in rules()]


def all_queries() -> list[tuple[str, str]]:
    return rule_queries() + k8s.dashboard_queries(k8s.load_dashboard())


def training_exposition() -> str:
    """What a training process serves on --metrics-port, from the real TrainingGauges."""
    from brst.train.fit.prometheus_gauges import TrainingGauges

    return generate_latest(TrainingGauges().registry).decode()


def cohort_exposition() -> str:
    """What a predict-cohort shard serves on --metrics-port, from the real CohortMetrics."""
    from brst.train.cohort.metrics import CohortMetrics

    return generate_latest(CohortMetrics().registry).decode()


def test_metric_names_come_from_the_parsed_expression():
    expr = ('sum by (namespace) (rate(Requests5XX{Level="Host"}[5m])) / on(namespace) group_left '
            'max_over_time(ts_queue_latency_microseconds[1h:5m]) and {__name__="brst_batch_size"}')
    assert k8s.metric_names(expr) == {"Requests5XX", "ts_queue_latency_microseconds", "brst_batch_size"}
    with pytest.raises(ValueError):
        k8s.metric_names("sum(rate(Requests5XX[5m])")


def test_exposition_names_follow_the_metric_types():
    text = ("# TYPE Requests5XX counter\n# TYPE brst_decode_seconds histogram\n"
            'brst_decode_seconds_bucket{le="0.1"} 1.0\n# TYPE up gauge\nup 1\n')
    assert k8s.exported_names(text) == {"Requests5XX", "brst_decode_seconds_bucket", "brst_decode_seconds_sum",
                                        "brst_decode_seconds_count", "up"}


def test_alert_rules_parse_and_say_what_to_do():
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for name, expr in rule_queries():
        assert k8s.metric_names(expr), f"{name}: selects no metric"
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        if "for" in rule:
            promql_parser.parse_duration(rule["for"])


def test_alert_rules_cover_what_the_hospital_watches():
    """Error ratio, latency, worker restarts, GPU memory and model readiness each have an alert."""
    selected = {name: k8s.metric_names(expr) for name, expr in rule_queries()}
    watched = set().union(*selected.values())
    for needed in ("Requests5XX", "ts_inference_latency_microseconds", "WorkerLoadTime",
                   "GPUMemoryUtilization", "kube_deployment_status_replicas_unavailable"):
        assert needed in watched, needed


def test_out_of_domain_alert_fires_on_the_flagged_share_over_15_minutes():
    """The rule is (flagged patches / patches answered) over 15 minutes > 20 %, held 15 minutes."""
    rule = next(rule for rule in rules() if rule["alert"] == "BrstOutOfDomainShareHigh")
    assert promql_parser.parse_duration(rule["for"]) == promql_parser.parse_duration("15m")
    expr = promql_parser.parse(rule["expr"])
    assert str(expr.op) == ">" and isinstance(expr.rhs, promql_parser.NumberLiteral) and expr.rhs.val == 0.2
    share = expr.lhs
    while isinstance(share, promql_parser.ParenExpr):
        share = share.expr
    assert str(share.op) == "/"
    assert k8s.metric_names(str(share.lhs)) == {"brst_out_of_domain_total"}
    assert k8s.metric_names(str(share.rhs)) == {"brst_patches_total"}
    windows = []
    promql_parser.walk(expr, pre_visit=lambda node: windows.append(node.range)
                       if isinstance(node, promql_parser.MatrixSelector) else None)
    assert windows and all(window == promql_parser.parse_duration("15m") for window in windows)


def test_rule_file_is_usable_without_the_prometheus_operator():
    """``yq '.spec' brst-alerts.yaml`` gives a plain Prometheus rule file: groups and nothing else."""
    spec = k8s.load_yaml_file(k8s.ALERT_RULES)["spec"]
    assert set(spec) == {"groups"}
    assert all(set(group) <= {"name", "interval", "rules", "limit"} for group in spec["groups"])


def test_the_dashboard_shows_cohort_progress_by_outcome():
    from brst.train.cohort.status import STATUSES

    [expr] = [expr for _, expr in k8s.dashboard_queries(k8s.load_dashboard())
              if "brst_cohort_slides_total" in k8s.metric_names(expr)]
    assert "by (status)" in expr
    text = cohort_exposition()
    assert {f'brst_cohort_slides_total{{status="{status}"}} 0.0' for status in STATUSES} <= set(text.splitlines())


def test_dashboard_queries_parse_and_panels_are_unique():
    dashboard = k8s.load_dashboard()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for where, expr in k8s.dashboard_queries(dashboard):
        assert k8s.metric_names(expr), f"{where}: selects no metric"


def test_rules_and_dashboard_read_only_metrics_that_are_exported(served_metrics_text):
    exported = (k8s.exported_names(served_metrics_text) | k8s.exported_names(training_exposition())
                | k8s.exported_names(cohort_exposition()) | set(k8s.EXTERNAL_METRICS))
    missing = {f"{where}: {name}" for where, expr in all_queries() for name in k8s.metric_names(expr)
               if name not in exported}
    assert not missing, "metrics nobody exports:\n" + "\n".join(sorted(missing))
