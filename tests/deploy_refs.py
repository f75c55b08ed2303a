"""Metric names referenced by the PromQL in deploy/ (the Grafana dashboard and the alert rules).

A helper for the tests, not a test: test_deploy.py checks the names against monitor/telemetry.py,
and a live-scrape test can check them against what the services export. A small tokenizer, not
a PromQL parser: it drops strings, label matchers, ranges, grouping labels and Grafana variables,
then keeps the identifiers that are not functions, aggregations or keywords.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import yaml

_KEYWORDS = frozenset({
    # binary operators and modifiers
    "and", "or", "unless", "bool", "on", "ignoring", "group_left", "group_right", "offset", "by",
    "without", "atan2",
    # aggregations (may be written `sum by (x) (...)`, i.e. not directly before a parenthesis)
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
    # number literals
    "inf", "nan",
})
# Everything between these and their parenthesis is label names, not metrics.
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE)
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"' r"|'(?:\\.|[^'\\])*'" r"|`[^`]*`")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GRAFANA_VARS = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_OFFSET = re.compile(r"\boffset\s+-?[\w.]+", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d[\w.]*(?:[eE][+-]?\d+)?)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\(\s*(?:(.*),)?\s*[\w]+\s*\)\s*$", re.DOTALL)
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def metric_names(expr: str) -> set[str]:
    """Metric names in one PromQL expression (histogram series reduced to their base name)."""
    m = _LABEL_VALUES.match(expr)  # Grafana's label_values(metric, label): the label is no metric
    if m:
        expr = m.group(1) or ""
    expr = _STRINGS.sub(" ", expr)  # first: strings may hold braces, '#' or identifiers
    expr = _GRAFANA_VARS.sub(" ", expr)
    expr = re.sub(r"#[^\n]*", " ", expr)
    expr = _MATCHERS.sub(" ", expr)
    expr = _RANGES.sub(" ", expr)
    expr = _OFFSET.sub(" ", expr)
    expr = _GROUPING.sub(" ", expr)
    expr = _NUMBER.sub(" ", expr)
    names = set()
    for ident, call in _IDENT.findall(expr):
        if call or ident.lower() in _KEYWORDS:
            continue
        names.add(_HISTOGRAM_SUFFIX.sub("", ident))
    return names


def _panels(panels: list) -> Iterator[dict]:
    for panel in panels or []:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside collapsed rows


def dashboard_exprs(dashboard: dict) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets, template variables, annotations."""
    exprs = []
    for panel in _panels(dashboard.get("panels", [])):
        exprs += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            if query:
                exprs.append(query)
    for ann in dashboard.get("annotations", {}).get("list", []):
        if ann.get("expr"):
            exprs.append(ann["expr"])
    return exprs


def rules_exprs(rules: dict) -> list[str]:
    return [rule["expr"] for group in rules.get("groups", []) for rule in group.get("rules", [])]


def referenced_metric_names(dashboard_path: str | Path, rules_path: str | Path) -> set[str]:
    """Metric names (e.g. spade_camera_fps, up) used by the dashboard JSON and the rules file."""
    dashboard = json.loads(Path(dashboard_path).read_text(encoding="utf-8"))
    rules = yaml.safe_load(Path(rules_path).read_text(encoding="utf-8"))
    names: set[str] = set()
    for expr in dashboard_exprs(dashboard) + rules_exprs(rules):
        names |= metric_names(expr)
    return names
