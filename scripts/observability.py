#!/usr/bin/env python3
"""Dashboards and alerts as code: write a stack's Prometheus rules, a node's scrape configuration
and the importable Grafana dashboard (kimi_fleet.observability), and optionally a picture of the
dashboard's panels drawn from a real Prometheus while fake engines serve a load.

    python scripts/observability.py h200-int4-sglang                 # build/h200-int4-sglang/observability/
    python scripts/observability.py h200-int4-sglang --out DIR
    python scripts/observability.py h200-int4-vllm --picture docs/img/dashboard.png [--seconds 60]

Files: prometheus-rules.yml (promtool check rules), prometheus-scrape.yml (one node: its loopback
targets, labelled stack=<stack> replica=0; a central Prometheus reaches them through the node's own
scrape route or agent), grafana-dashboard.json (Grafana: Dashboards > Import, pick the Prometheus
data source).

--picture needs prometheus, caddy and matplotlib; the engines are tests/fakes/fake_engine.py
(the pinned engines' metric names), the GPU and node-state exporters fixed-reading stand-ins: the
picture shows how the panels read, not a real GPU's numbers.

Exit codes: 0 written, 2 an unknown or refused stack, 1 an unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from kimi_fleet import observability  # noqa: E402
from kimi_fleet.launch import render_launch  # noqa: E402
from kimi_fleet.resolve import Resolved  # noqa: E402
from kimi_fleet.spec import StackSpecError  # noqa: E402
from kimi_fleet.stackfile import load_stack_config, stack_file, stack_names  # noqa: E402


def write_artifacts(stack: str, out: Path) -> list[Path]:
    spec = load_stack_config(stack_file(stack)).spec()
    r = Resolved(spec)
    targets = observability.node_scrape_targets(render_launch(r), r.accelerator.vendor)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "prometheus-rules.yml": observability.render_prometheus_rules(spec),
        "prometheus-scrape.yml": observability.render_prometheus_scrape_config(
            stack, targets, {observability.REPLICA_LABEL: "0"}, rule_files=("prometheus-rules.yml",)),
        "grafana-dashboard.json": json.dumps(observability.render_grafana_dashboard(spec), indent=2) + "\n",
    }
    written = []
    for name, text in files.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


def draw_picture(stack: str, path: Path, seconds: float) -> None:
    """Run the observed node (tests/fakes/observed_node.py) under a rising then falling load and draw
    every panel's queries over that span from Prometheus's range API."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tests.fakes.observed_node import load, observed_node

    with tempfile.TemporaryDirectory(prefix="kimi-dashboard-") as tmp, observed_node(stack, Path(tmp)) as node:
        start = time.time()
        # three waves of clients: 2, 6, then 10 at once (the engine runs 2, the rest queue), then quiet
        wave = seconds / 4
        for workers in (2, 6, 10):
            thread = threading.Thread(target=load, args=(node.proxy_url, wave, workers))
            thread.start()
            thread.join()
        time.sleep(wave)
        end = time.time()
        panels = observability.DASHBOARD_PANELS
        columns = 3
        rows = -(-len(panels) // columns)
        figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 2.6 * rows), squeeze=False)
        for axis, panel in zip(axes.flat, panels):
            for query in panel.queries:
                for series in node.prometheus.query_range(query.promql(node.engine, stack), start, end, 1.0):
                    xs = [float(t) - start for t, _ in series["values"]]
                    ys = [float(v) for _, v in series["values"]]
                    legend = query.legend
                    for key, value in series["metric"].items():
                        legend = legend.replace("{{" + key + "}}", value)
                    axis.plot(xs, ys, label=legend, linewidth=1.4)
            axis.set_title(panel.title, fontsize=10)
            axis.set_xlabel("seconds", fontsize=8)
            axis.tick_params(labelsize=8)
            if axis.lines:
                axis.legend(fontsize=7, loc="upper left")
        for axis in list(axes.flat)[len(panels):]:
            axis.axis("off")
        figure.suptitle(f"kimi-fleet {stack}: the Grafana dashboard's queries against a real Prometheus, "
                        f"fake {node.engine} engine under a stepped load (GPU and node state: fixed stand-ins)",
                        fontsize=11)
        figure.tight_layout(rect=(0, 0, 1, 0.97))
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack", help="a stack name (stacks/Pulumi.<stack>.yaml)")
    parser.add_argument("--out", type=Path, help="directory for the files (default: build/<stack>/observability)")
    parser.add_argument("--picture", type=Path, help="also draw the dashboard's panels under a fake load to this PNG")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the picture's load")
    args = parser.parse_args(argv)
    if args.stack not in stack_names():
        print(f"unknown stack {args.stack!r}; stacks: {', '.join(stack_names())}", file=sys.stderr)
        return 2
    try:
        written = write_artifacts(args.stack, args.out or PROJECT_ROOT / "build" / args.stack / "observability")
    except (StackSpecError, ValueError) as error:
        print(f"{args.stack}: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    if args.picture:
        draw_picture(args.stack, args.picture, args.seconds)
        print(args.picture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
