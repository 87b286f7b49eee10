"""Prometheus alerting rules for preprocessing streams (``mlflow-preproc alert-rules``).

Every rule reads the stream's own metrics and Prometheus' ``up``; ``job`` and ``instance`` are
the scrape target's, so one rule serves every deployment. tests/test_monitoring.py checks them
with ``promtool check rules``, unit-tests each alert with ``promtool test rules`` and evaluates
them on a real Prometheus scraping a real stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

GROUP = "mlflow-preproc"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str


def alerts(lag_threshold: int = 1000, dead_letter_ratio: float = 0.05,
           job: str | None = None, namespace: str | None = None) -> list[Alert]:
    """The rules, with the thresholds an operator tunes; ``job`` and ``namespace`` scope them
    to one scrape job (a Kubernetes deployment's PrometheusRule watches its own pods only,
    not a same-named deployment's in another namespace)."""
    only = ", ".join(f'{label}="{value}"' for label, value in
                     (("job", job), ("namespace", namespace)) if value)

    def m(metric: str, matchers: str = "") -> str:
        inside = ", ".join(x for x in (only, matchers) if x)
        return f"{metric}{{{inside}}}" if inside else metric

    records_in = m("mlflow_preproc_records_total", 'outcome="in"')
    records_failed = m("mlflow_preproc_records_total", 'outcome="failed"')
    revision = m("mlflow_preproc_revision", 'deployment!=""')
    ours = f"group by (job, instance) (present_over_time({m('mlflow_preproc_records_total')}[1h]))"
    return [
        Alert("PreprocConsumerLagGrowing",
              f"sum by (job, topic) ({m('mlflow_preproc_consumer_lag')}) > {lag_threshold} and "
              f"delta(sum by (job, topic) ({m('mlflow_preproc_consumer_lag')})[10m:1m]) > 0",
              "10m", "warning", "{{ $labels.job }} falls behind on {{ $labels.topic }}",
              f"Consumer lag is above {lag_threshold} and grew over the last 10 minutes: add "
              "consumers (KAFKA_CONSUMERS, replicas) or look at the batch latency."),
        Alert("PreprocNoProgress",
              f"sum by (job, instance) (rate({records_in}[5m])) == 0 and on "
              f"(job, instance) sum by (job, instance) ({m('mlflow_preproc_consumer_lag')}) > 0 "
              "and on (job, instance) sum by (job, instance) "
              f"({m('mlflow_preproc_waiting_for_dependency')}) == 0 and on (job, instance) "
              f"sum by (job, instance) ({m('mlflow_preproc_partitions_assigned')}) > 0",
              "5m", "critical", "{{ $labels.instance }} owns partitions with lag but reads "
              "nothing", "Records wait and the consumer fetched none for 5 minutes while not "
              "waiting for a dependency; /healthz says why. Restarting it re-joins the group."),
        Alert("PreprocDeadLetterRatioHigh",
              f"sum by (job) (rate({records_failed}[5m])) / "
              f"sum by (job) (rate({records_in}[5m])) > {dead_letter_ratio}",
              "5m", "warning", f"{{{{ $labels.job }}}} dead-letters more than "
              f"{dead_letter_ratio:.0%} of its records", "mlflow-preproc dlq inspect "
              "<topic>-dlq shows which stage and error; fix the model, then mlflow-preproc dlq "
              "replay."),
        Alert("PreprocDeadLetterBrake",
              f"max by (job, instance) ({m('mlflow_preproc_dead_letter_brake')}) == 1", "0m",
              "critical", "{{ $labels.instance }} stopped: the dead-letter brake is engaged",
              "Most recent records failed, so the stream commits nothing and fails /healthz: "
              "the model or its configuration is at fault. A rollout of this version rolls "
              "back; else deploy a fixed version."),
        # A revision that ran in the last 30 minutes is above every revision running now: the
        # target's rollout rolled it back (or an operator undid it). It fires for 30 minutes.
        Alert("PreprocRolloutRolledBack",
              f"max by (job, deployment) (max_over_time({revision}[30m])) > "
              f"max by (job, deployment) ({revision})", "0m", "warning",
              "{{ $labels.deployment }} rolled back from revision {{ $value }}",
              "The new revision was not healthy, and the previous one runs again (same image, "
              "settings and consumer group). mlflow deployments get -t preproc --name "
              "{{ $labels.deployment }} shows what runs; the update's output said why."),
        Alert("PreprocInstanceDown", f"{m('up')} == 0 and on (job, instance) {ours}", "2m",
              "critical", "{{ $labels.instance }} of {{ $labels.job }} is down",
              "Prometheus cannot scrape it for 2 minutes."),
    ]


def rules_yaml(lag_threshold: int = 1000, dead_letter_ratio: float = 0.05) -> str:
    """The rules file Prometheus (``rule_files``) takes."""
    return yaml.safe_dump({"groups": [rule_group(lag_threshold, dead_letter_ratio)]},
                          sort_keys=False, width=1000)


def rule_group(lag_threshold: int = 1000, dead_letter_ratio: float = 0.05,
               job: str | None = None, namespace: str | None = None) -> dict:
    """One rule group (a PrometheusRule's ``spec.groups`` item, with ``job`` and
    ``namespace`` set)."""
    return {"name": f"{GROUP}-{job}" if job else GROUP, "rules": [
        {"alert": a.name, "expr": a.expr, "for": a.for_, "labels": {"severity": a.severity},
         "annotations": {"summary": a.summary, "description": a.description}}
        for a in alerts(lag_threshold, dead_letter_ratio, job, namespace)]}
