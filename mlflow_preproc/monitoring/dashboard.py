"""A Grafana dashboard for preprocessing streams (``mlflow-preproc dashboard``), built with
Grafana's own ``grafana-foundation-sdk`` (``pip install '.[monitoring]'`` in the mlflow-preproc
clone).

One row per question an operator asks: is it keeping up (records, lag), what fails (dead
letters by stage and error type), is the group healthy (commits, rebalances, the brake), and
what does it cost (batch latency, producer queue, CPU, memory). ``$job`` and ``$instance`` are
the scrape target's labels: one dashboard for every deployment. :data:`PANELS` holds the
queries, which tests/test_monitoring.py evaluates on a real Prometheus.
"""

from __future__ import annotations

_SEL = 'job=~"$job", instance=~"$instance"'

# (row, title, unit, [(query, legend)]): the dashboard, as data.
PANELS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    ("Keeping up", "Records per second", "ops", [
        (f'sum by (instance, outcome) (rate(mlflow_preproc_records_total{{{_SEL}}}'
         '[$__rate_interval]))', "{{instance}} {{outcome}}")]),
    ("Keeping up", "Consumer lag per partition", "short", [
        (f"sum by (topic, partition) (mlflow_preproc_consumer_lag{{{_SEL}}})",
         "{{topic}}/{{partition}}")]),
    ("Dead letters", "Dead letters by stage and error type", "ops", [
        (f"sum by (stage, error_type) (rate(mlflow_preproc_dead_letters_total{{{_SEL}}}"
         "[$__rate_interval]))", "{{stage}} {{error_type}}")]),
    ("Dead letters", "Dead-letter brake engaged", "bool", [
        (f"max by (instance) (mlflow_preproc_dead_letter_brake{{{_SEL}}})", "{{instance}}")]),
    ("Group", "Commits per second", "ops", [
        (f"sum by (instance) (rate(mlflow_preproc_commits_total{{{_SEL}}}[$__rate_interval]))",
         "{{instance}}")]),
    ("Group", "Rebalances (partitions moved)", "short", [
        (f"sum by (instance, kind) (increase(mlflow_preproc_rebalances_total{{{_SEL}}}"
         "[$__rate_interval]))", "{{instance}} {{kind}}"),
        (f"sum by (instance) (mlflow_preproc_partitions_assigned{{{_SEL}}})",
         "{{instance}} owns")]),
    ("Group", "Revision running", "short", [
        (f"max by (deployment, instance) (mlflow_preproc_revision{{{_SEL}}})",
         "{{deployment}} {{instance}}")]),
    ("Cost", "Batch latency", "s", [
        (f"histogram_quantile({q}, sum by (le) (rate(mlflow_preproc_batch_seconds_bucket"
         f"{{{_SEL}}}[$__rate_interval])))", f"p{int(q * 100)}")
        for q in (0.5, 0.9, 0.99)]),
    ("Cost", "Producer queue", "short", [
        (f"sum by (instance) (mlflow_preproc_producer_queue{{{_SEL}}})", "{{instance}}")]),
    ("Cost", "Process CPU", "percentunit", [
        (f"rate(process_cpu_seconds_total{{{_SEL}}}[$__rate_interval])", "{{instance}}")]),
    ("Cost", "Process memory", "bytes", [
        (f"process_resident_memory_bytes{{{_SEL}}}", "{{instance}}")]),
]


def build():
    """The dashboard, as the SDK's model (``.build()`` of its builder)."""
    from grafana_foundation_sdk.builders.dashboard import Dashboard, QueryVariable, Row
    from grafana_foundation_sdk.builders.prometheus import Dataquery
    from grafana_foundation_sdk.builders.timeseries import Panel

    board = (Dashboard("mlflow-preproc streams").uid("mlflow-preproc").tags(["mlflow-preproc"])
             .refresh("30s").time("now-1h", "now"))
    for name, query in (("job", "label_values(mlflow_preproc_records_total, job)"),
                        ("instance", 'label_values(mlflow_preproc_records_total{job=~"$job"}, '
                                     "instance)")):
        board = board.with_variable(QueryVariable(name).label(name).query(query).multi(True)
                                    .include_all(True).refresh(2))
    row = None
    for row_title, title, unit, queries in PANELS:
        if row_title != row:
            board, row = board.with_row(Row(row_title)), row_title
        panel = Panel().title(title).unit(unit).height(8).span(12)
        for ref, (expr, legend) in zip("ABCDEFGH", queries):
            panel = panel.with_target(Dataquery().expr(expr).legend_format(legend).ref_id(ref))
        board = board.with_panel(panel)
    return board.build()


def dashboard_json() -> str:
    """The dashboard JSON Grafana imports (or a ConfigMap with ``grafana_dashboard`` holds)."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    return JSONEncoder(sort_keys=True, indent=2).encode(build())


def queries() -> list[str]:
    """Every panel's query, with the dashboard's variables as Prometheus would see them."""
    return [expr.replace("$job", ".*").replace("$instance", ".*")
            .replace("$__rate_interval", "1m")
            for _, _, _, targets in PANELS for expr, _ in targets]
