#!/usr/bin/env python3
"""Draw the Grafana dashboard's panels from a live Prometheus into one PNG.

    python deploy/render_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --dashboard deploy/grafana/dashboards/spade-monitor.json --minutes 5 --out docs/dashboard.png [--camera ID]

Grafana itself cannot run everywhere (CI, this project's dev machines); this runs each panel's
queries through Prometheus's /api/v1/query_range and draws one subplot per panel, so the
dashboard can be looked at, and its queries checked, with only Prometheus. Grafana variables are
substituted as Grafana would: $camera by a regex of all cameras (or --camera),
$__rate_interval, $__interval and $__range from the time range.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from pathlib import Path

DEFAULT_DASHBOARD = Path(__file__).resolve().parent / "grafana" / "dashboards" / "spade-monitor.json"
SCRAPE_INTERVAL_S = 5  # deploy/prometheus/prometheus.yml
MAX_POINTS = 300  # per series, like Grafana's max data points for a small panel
_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LEGEND_LABEL = re.compile(r"\{\{\s*([\w.]+)\s*\}\}")
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\(\s*(?:(.*)\s*,)?\s*(\w+)\s*\)\s*$", re.DOTALL)
_REGEX_SPECIAL = re.compile(r"([\\.^$*+?()\[\]{}|])")


class UserError(Exception):
    """A problem the user can fix; reported as one line, exit status 2."""


class QueryError(Exception):
    """Prometheus refused one query (reported in its panel)."""


# -- Grafana variables (pure functions) --------------------------------------------------------

def regex_value(values: list[str]) -> str:
    """A multi-value variable as Grafana writes it into a PromQL regex matcher: escaped, (a|b).

    The escapes are doubled because the regex sits inside a double-quoted PromQL string.
    """
    if not values:
        return ".*"
    escaped = [_REGEX_SPECIAL.sub(r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def time_variables(range_s: int, step_s: int) -> dict[str, str]:
    """Grafana's built-in interval variables for a query over range_s seconds at step_s."""
    # $__rate_interval: at least four scrapes, and never shorter than one step.
    rate_interval = max(30, 4 * SCRAPE_INTERVAL_S, step_s + SCRAPE_INTERVAL_S)
    return {"__interval": f"{step_s}s", "__interval_ms": str(step_s * 1000),
            "__rate_interval": f"{rate_interval}s", "__range": f"{range_s}s",
            "__range_s": str(range_s), "__range_ms": str(range_s * 1000)}


def substitute(text: str, variables: dict[str, str]) -> str:
    """Replace $name, ${name}, ${name:format} and [[name]]; unknown names are left alone."""
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return variables.get(name, m.group(0))
    return _VARIABLE.sub(repl, text)


def legend(fmt: str | None, labels: dict[str, str]) -> str:
    """A series' legend from the target's legendFormat, like Grafana's {{label}} templates."""
    if fmt and fmt != "__auto":
        return _LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), fmt).strip() or "series"
    name = labels.get("__name__", "")
    rest = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return f"{name}{{{rest}}}" if rest else (name or "value")


def iter_panels(panels: list) -> list[dict]:
    """Panels in dashboard order, rows left out and collapsed rows' panels included."""
    out = []
    for panel in panels or []:
        if panel.get("type") == "row":
            out += iter_panels(panel.get("panels", []))
        else:
            out.append(panel)
    return out


# -- Prometheus ---------------------------------------------------------------------------------

class Prometheus:
    def __init__(self, url: str, timeout_s: float = 15.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, params: list[tuple[str, str]]) -> object:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; the body says why
            try:
                body = json.load(exc)
            except ValueError:
                raise QueryError(f"HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"cannot reach Prometheus at {self.url}: {reason}") from None
        except ValueError:
            raise UserError(f"{self.url} did not answer with JSON; is it a Prometheus server?") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error", "unknown error") if isinstance(body, dict) else "unexpected answer"
            raise QueryError(str(error))
        return body["data"]

    def check(self) -> None:
        self._get("/api/v1/query", [("query", "1")])

    def label_values(self, label: str, match: str | None, start: float, end: float) -> list[str]:
        params = [("start", f"{start:.3f}"), ("end", f"{end:.3f}")]
        if match:
            params.append(("match[]", match))
        return sorted(self._get(f"/api/v1/label/{urllib.parse.quote(label)}/values", params))

    def query_range(self, expr: str, start: float, end: float, step_s: int) -> list[dict]:
        data = self._get("/api/v1/query_range", [("query", expr), ("start", f"{start:.3f}"),
                                                  ("end", f"{end:.3f}"), ("step", str(step_s))])
        return data.get("result", [])


def dashboard_variables(dashboard: dict, prom: Prometheus, start: float, end: float,
                        overrides: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Values of the dashboard's label_values() variables: (for queries, for titles)."""
    for_queries, for_titles = {}, {}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var.get("name")
        if not name or var.get("type") != "query":
            continue
        if name in overrides:
            values = [overrides[name]]
        else:
            query = var.get("query")
            query = query.get("query", "") if isinstance(query, dict) else (query or var.get("definition", ""))
            m = _LABEL_VALUES.match(query or "")
            values = prom.label_values(m.group(2), m.group(1), start, end) if m else []
        for_queries[name] = regex_value(values)
        for_titles[name] = ", ".join(values) if values else "all"
    return for_queries, for_titles


# -- drawing ------------------------------------------------------------------------------------

_UNITS = {"s": "seconds", "bytes": "bytes", "percentunit": "fraction", "short": None}


def _mapped(panel: dict, value: float) -> str:
    """The text a stat panel's value mapping gives to value, else the number."""
    for mapping in panel.get("fieldConfig", {}).get("defaults", {}).get("mappings", []):
        if mapping.get("type") == "value":
            for key, result in mapping.get("options", {}).items():
                try:
                    if float(key) == value and result.get("text"):
                        return result["text"]
                except ValueError:
                    continue
    return f"{value:.4g}"


def _float(v: str) -> float:
    """A sample value; NaN and +Inf (e.g. a quantile in the +Inf bucket) become gaps."""
    try:
        x = float(v)
    except ValueError:
        return math.nan
    return x if math.isfinite(x) else math.nan


def render(dashboard: dict, prom: Prometheus, minutes: float, out: Path, camera: str | None) -> int:
    """Query and draw every panel; returns the number of queries Prometheus refused."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    end = time.time()
    range_s = max(1, int(round(minutes * 60)))
    start = end - range_s
    step_s = max(SCRAPE_INTERVAL_S, math.ceil(range_s / MAX_POINTS))
    overrides = {"camera": camera} if camera else {}
    query_vars, title_vars = dashboard_variables(dashboard, prom, start, end, overrides)
    query_vars.update(time_variables(range_s, step_s))

    panels = iter_panels(dashboard.get("panels", []))
    if not panels:
        raise UserError("the dashboard has no panels")
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 3.4 * nrows), squeeze=False)
    failures = 0
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(substitute(panel.get("title", ""), title_vars), fontsize=10)
        drawn, errors = 0, []
        for target in panel.get("targets", []):
            if target.get("hide") or not target.get("expr"):
                continue
            expr = substitute(target["expr"], query_vars)
            try:
                series = prom.query_range(expr, start, end, step_s)
            except QueryError as exc:
                failures += 1
                errors.append(str(exc))
                print(f"render_dashboard: warning: panel '{panel.get('title')}': {exc}: {expr}", file=sys.stderr)
                continue
            for s in series:
                points = [(datetime.fromtimestamp(float(t)), _float(v)) for t, v in s.get("values", [])]
                if not points:
                    continue
                label = legend(target.get("legendFormat"), s.get("metric", {}))
                if panel.get("type") == "stat":  # a stat shows its last value
                    last = next((v for _, v in reversed(points) if not math.isnan(v)), math.nan)
                    label = f"{label}: {_mapped(panel, last)}"
                xs, ys = zip(*points)
                style = "steps-post" if panel.get("type") == "stat" else "default"
                ax.plot(xs, ys, label=label, linewidth=1.2, drawstyle=style)
                drawn += 1
        if drawn:
            handles, labels = ax.get_legend_handles_labels()
            if len(labels) > 8:
                handles, labels = handles[:8], labels[:7] + [f"... {len(labels) - 7} more"]
            ax.legend(handles, labels, fontsize=7, loc="upper left")
            ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
            ax.tick_params(labelsize=7)
            unit = _UNITS.get(panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short"), None)
            if unit:
                ax.set_ylabel(unit, fontsize=8)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.grid(alpha=0.3)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
            text = "query error:\n" + "\n".join(errors) if errors else "no data"
            ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes,
                    color="red" if errors else "gray", fontsize=9, wrap=True)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    cams = title_vars.get("camera", "all")
    fig.suptitle(f"{dashboard.get('title', 'dashboard')}: last {minutes:g} min, camera {cams}, "
                 f"{datetime.fromtimestamp(end):%Y-%m-%d %H:%M:%S}", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=90)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    parser.add_argument("--dashboard", type=Path, default=DEFAULT_DASHBOARD, help="Grafana dashboard JSON")
    parser.add_argument("--minutes", type=float, default=5.0, help="time range, ending now")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--camera", help="one camera id (default: all cameras)")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds per Prometheus request")
    args = parser.parse_args(argv)
    try:
        if not args.minutes > 0:
            raise UserError(f"--minutes: expected a number > 0, got {args.minutes:g}")
        try:
            dashboard = json.loads(args.dashboard.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"dashboard not found: {args.dashboard}") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"{args.dashboard}: not a readable dashboard JSON ({exc.__class__.__name__})") from None
        prom = Prometheus(args.prometheus, args.timeout)
        prom.check()
        failures = render(dashboard, prom, args.minutes, args.out, args.camera)
    except (UserError, QueryError) as exc:
        print(f"render_dashboard: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}" + (f" ({failures} queries failed)" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
