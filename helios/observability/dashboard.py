"""The series that Helios's Grafana dashboard and alert rules query, read from their files.

`observability/helios-dashboard.json` and `observability/helios-alerts.yml` name series by
hand; a renamed metric would leave a panel empty or an alert silent without any error. These
functions list the series names each file's PromQL uses, exactly as written (a histogram's
`_bucket`, a counter's `_total`), so a test can hold them against the metric catalogue and
an integration test against what a real Prometheus scraped.

The extraction is lexical, not a PromQL parser: it drops strings, comments, label matchers
(`{...}`), label lists (`by (...)`, `on (...)`, ...), ranges and offsets, Grafana variables,
numbers and durations, then keeps the identifiers that are neither keywords nor followed by
`(` (a function or aggregation call). That is enough for well-formed queries, which
`promtool` checks separately.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# Words PromQL reserves (aggregations without their parentheses, binary operators,
# modifiers) and the float literals; none can be a series name where it stands.
_KEYWORDS = frozenset({
    "and", "or", "unless", "atan2", "bool", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
    "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio", "inf", "nan",
})
_NAME_MATCHER = re.compile(r"""__name__\s*=\s*(?:"([^"\\]*)"|'([^'\\]*)')""")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_COMMENT = re.compile(r"#[^\n]*")
_GRAFANA_VARIABLE = re.compile(r"\$(?:\{[^}]*\}|\w+)")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_TOKEN = re.compile(r"(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z0-9_]*)"
                    r"|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<call>\s*\()?")


def promql_metric_names(expr: str) -> set[str]:
    """The series names one PromQL expression selects (`{__name__="x"}` included)."""
    names = {a or b for a, b in _NAME_MATCHER.findall(expr)}
    text = _GRAFANA_VARIABLE.sub(" ", _COMMENT.sub(" ", _STRING.sub('""', expr)))
    text = _RANGE.sub(" ", _LABEL_LIST.sub(r"\1", _MATCHERS.sub(" ", text)))
    for token in _TOKEN.finditer(text):
        name = token.group("name")
        if name and not token.group("call") and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard_exprs(path: str | Path) -> list[str]:
    """Every panel target's PromQL in a Grafana dashboard JSON, rows' panels included."""
    dashboard = json.loads(Path(path).read_text())
    return [target["expr"] for panel in _panels(dashboard.get("panels", []))
            for target in panel.get("targets", []) if target.get("expr")]


def rules_exprs(path: str | Path) -> list[str]:
    """Every rule's PromQL in a Prometheus rule file (alerting and recording rules)."""
    rules = yaml.safe_load(Path(path).read_text()) or {}
    return [rule["expr"] for group in rules.get("groups", []) for rule in group.get("rules", [])]


def dashboard_metric_names(path: str | Path) -> set[str]:
    """The series names a Grafana dashboard's panel queries use, exactly as written."""
    return set().union(*map(promql_metric_names, dashboard_exprs(path)))


def rules_metric_names(path: str | Path) -> set[str]:
    """The series names a Prometheus rule file's expressions use, exactly as written."""
    return set().union(*map(promql_metric_names, rules_exprs(path)))
