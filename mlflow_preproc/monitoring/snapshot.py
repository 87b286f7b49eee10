"""The dashboard's panels drawn from a real Prometheus, as a PNG (matplotlib): what an operator
would see in Grafana, for the docs and for a test to look at. ``pip install matplotlib``."""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request

from mlflow_preproc.monitoring.dashboard import PANELS


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list:
    """``/api/v1/query_range`` of ``expr``: a list of (labels, [(t, value)])."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.loads(r.read())
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body.get('error')}")
    return [(s["metric"], [(float(t), float(v)) for t, v in s["values"]])
            for s in body["data"]["result"]]


def render(prometheus: str, path: str, start: float, end: float, step: float = 2.0,
           rate_interval: str = "30s") -> dict[str, int]:
    """Draw every panel over [start, end] into ``path``; returns the series drawn per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2
    rows = math.ceil(len(PANELS) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(13, 2.6 * rows), squeeze=False)
    drawn = {}
    for ax, (row, title, unit, targets) in zip(axes.flat, PANELS):
        drawn[title] = 0
        for expr, legend in targets:
            expr = expr.replace("$job", ".*").replace("$instance", ".*") \
                .replace("$__rate_interval", rate_interval)
            for labels, points in query_range(prometheus, expr, start, end, step):
                name = legend
                for key, value in labels.items():
                    name = name.replace("{{" + key + "}}", value)
                ax.plot([t - start for t, _ in points], [v for _, v in points],
                        label=name.strip() or expr[:30])
                drawn[title] += 1
        ax.set_title(f"{row}: {title}", fontsize=9, loc="left")
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        if drawn[title]:
            ax.legend(fontsize=6, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds", fontsize=8)
    figure.suptitle("mlflow-preproc streams", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return drawn
