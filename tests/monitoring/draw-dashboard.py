#!/usr/bin/env python3
"""Draws a Grafana dashboard's time-series panels as one SVG, from a real Prometheus.

Each panel's own queries are evaluated by Prometheus (`/api/v1/query_range`) with the
dashboard's variables filled in, and drawn where the dashboard's grid puts the panel,
with its title, unit and legend. It is no Grafana, but it shows what the dashboard
shows: the same queries over the same data. Standard library only.

    draw-dashboard.py --prometheus http://127.0.0.1:9090 --dashboard pil-dashboard.json \
        --start 1767000000 --end 1767000090 --instance vest --out dashboard.svg
"""

import argparse
import html
import json
import math
import re
import urllib.parse
import urllib.request

COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff780a", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a"]
COL = 62  # pixels per grid column (24 columns)
ROW = 34  # pixels per grid row
PAD = 6


def query_range(prometheus, expr, start, end, step):
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise SystemExit(f"query failed: {expr}: {body}")
    return body["data"]["result"]


def legend(fmt, labels):
    if not fmt:
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def fmt_value(v, unit):
    if unit == "percentunit":
        return f"{v * 100:.1f}%" if 0 < v < 0.1 else f"{v * 100:.0f}%"
    if unit == "s":
        if v == 0:
            return "0"
        if v < 0.01:
            return f"{v * 1000:.1f} ms"
        return f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s"
    if unit == "bytes":
        for size, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if v >= size:
                return f"{v / size:.1f} {name}"
        return f"{v:.0f} B"
    suffix = "/s" if unit == "reqps" else ""
    if abs(v) >= 1000:
        return f"{v / 1000:.1f}k{suffix}"
    if v == int(v):
        return f"{int(v)}{suffix}"
    return f"{v:.2f}{suffix}"


def nice_max(v):
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def panel_svg(panel, series, start, end):
    g = panel["gridPos"]
    x, y, w, h = g["x"] * COL + PAD, g["y"] * ROW + PAD, g["w"] * COL - 2 * PAD, g["h"] * ROW - 2 * PAD
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    out = [
        f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="3" fill="#181b1f" stroke="#2c3235"/>',
        f'<text x="{x + 10}" y="{y + 20}" class="title">{html.escape(panel["title"])}</text>',
    ]
    legend_rows = max(1, math.ceil(len(series) / 3))
    px, py = x + 62, y + 34
    pw, ph = w - 76, h - 58 - 16 * legend_rows
    values = [v for s in series for _, v in s["points"] if not math.isnan(v)]
    top = nice_max(max(values) if values else 1.0)
    if unit == "percentunit":
        top = max(top, 1.0) if max(values or [0]) > 0.5 else top
    for i in range(5):
        gy = py + ph - ph * i / 4
        out.append(f'<line x1="{px}" y1="{gy:.1f}" x2="{px + pw}" y2="{gy:.1f}" stroke="#2c3235"/>')
        out.append(f'<text x="{px - 6}" y="{gy + 4:.1f}" class="axis" text-anchor="end">{fmt_value(top * i / 4, unit)}</text>')
    span = max(end - start, 1)
    for i in range(4):
        t = start + span * i / 3
        tx = px + pw * i / 3
        label = f"-{(end - t) / 60:.1f} min" if i < 3 else "now"
        out.append(f'<text x="{tx:.1f}" y="{py + ph + 14}" class="axis" text-anchor="middle">{label}</text>')
    if not series:
        out.append(f'<text x="{px + pw / 2}" y="{py + ph / 2}" class="empty" text-anchor="middle">No data</text>')
    for n, s in enumerate(series):
        color = COLORS[n % len(COLORS)]
        runs, run = [], []
        for t, v in s["points"]:
            if math.isnan(v):
                if run:
                    runs.append(run)
                run = []
                continue
            run.append(f"{px + pw * (t - start) / span:.1f},{py + ph - ph * min(v, top) / top:.1f}")
        if run:
            runs.append(run)
        for r in runs:
            out.append(f'<polyline points="{" ".join(r)}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        lx = x + 12 + (n % 3) * (w - 24) / 3
        ly = py + ph + 32 + 16 * (n // 3)
        out.append(f'<rect x="{lx:.1f}" y="{ly - 8}" width="12" height="3" fill="{color}"/>')
        out.append(f'<text x="{lx + 16:.1f}" y="{ly - 3}" class="legend">{html.escape(s["name"][:38])}</text>')
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--dashboard", required=True)
    ap.add_argument("--start", type=float, required=True)
    ap.add_argument("--end", type=float, required=True)
    ap.add_argument("--instance", default=".*")
    ap.add_argument("--rate-interval", default="5s")
    ap.add_argument("--skip", action="append", default=[], help="leave out panels whose title starts so")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dashboard = json.load(open(a.dashboard))
    step = max((a.end - a.start) / 240, 1)
    panels = [p for p in dashboard["panels"] if p.get("type") == "timeseries"
              and not any(p["title"].startswith(s) for s in a.skip)]
    # Panels left out close up: the ones below move into the gap.
    rows = sorted({p["gridPos"]["y"] for p in panels})
    shift = {y: rows.index(y) * 8 for y in rows}
    body = []
    bottom = 0
    for panel in panels:
        panel = dict(panel, gridPos=dict(panel["gridPos"], y=shift[panel["gridPos"]["y"]]))
        series = []
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", a.rate_interval).replace("$instance", a.instance)
            for r in query_range(a.prometheus, expr, a.start, a.end, step):
                points = [(float(t), float(v)) for t, v in r["values"]]
                series.append({"name": legend(target.get("legendFormat"), r["metric"]), "points": points})
        body += panel_svg(panel, series, a.start, a.end)
        g = panel["gridPos"]
        bottom = max(bottom, (g["y"] + g["h"]) * ROW)
    width, height = 24 * COL, bottom + 40
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        "<style>text{font-family:Inter,Helvetica,Arial,sans-serif;fill:#ccccdc}"
        ".title{font-size:13px;font-weight:600}.axis{font-size:10px;fill:#8e8e8e}"
        ".legend{font-size:11px}.empty{font-size:12px;fill:#8e8e8e}.foot{font-size:11px;fill:#8e8e8e}</style>",
        f'<rect width="{width}" height="{height}" fill="#111217"/>',
        *body,
        f'<text x="{PAD + 4}" y="{height - 14}" class="foot">{html.escape(dashboard["title"])} dashboard '
        f"(docs/monitoring/pil-dashboard.json), node {html.escape(a.instance)}: its own queries, "
        "evaluated by Prometheus over a test run of three federated regions</text>",
        "</svg>",
    ]
    with open(a.out, "w") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
