"""Which metrics, labels and functions a PromQL expression names: enough to check the
dashboard and the rules against deploy/metric_names.txt without a Prometheus.

A tokenizer, not a parser: strings, ranges `[5m]`, Grafana variables (`$model`,
`${datasource}`, `$__rate_interval`) and prometheus-adapter templates (`<<.Series>>`)
are tokens of their own, so what remains is identifiers, braces and parentheses.
An identifier is then a function (before `(`), a keyword, a label (inside `{}` or the
parentheses of by/without/on/ignoring/group_left/group_right) or else a metric name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


FUNCTIONS = _words(
    """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil
    changes clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week
    day_of_year days_in_month deg delta deriv exp floor histogram_avg histogram_count
    histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum
    holt_winters double_exponential_smoothing hour idelta increase irate label_join
    label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time
    minute month pi predict_linear present_over_time quantile_over_time rad rate resets
    round scalar sgn sin sinh sort sort_desc sort_by_label sort_by_label_desc sqrt
    stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year
    """
)
AGGREGATIONS = _words(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk "
    "limit_ratio"
)
LABEL_LIST_KEYWORDS = _words("by without on ignoring group_left group_right")
KEYWORDS = _words("and or unless bool offset atan2 inf nan") | LABEL_LIST_KEYWORDS

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<template><<[^>]*>>)
  | (?P<variable>\$\{[^}]*\}|\$\w+)
  | (?P<number>0x[0-9a-fA-F]+|\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|[smhdwy])*)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<matcher>=~|!~|!=|==|>=|<=|=|>|<)
  | (?P<punct>[(){},+\-*/%^@])
    """,
    re.VERBOSE,
)


@dataclass
class Names:
    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)


def names(expr: str) -> Names:
    """The metric, label and function names in one PromQL expression."""
    tokens = _tokenize(expr)
    found = Names()
    braces = parens = 0
    label_list_at: int | None = None  # paren depth of an open by(...) or on(...) list
    for i, (kind, text) in enumerate(tokens):
        if kind == "punct":
            braces += {"{": 1, "}": -1}.get(text, 0)
            parens += {"(": 1, ")": -1}.get(text, 0)
            if label_list_at is not None and parens < label_list_at:
                label_list_at = None
        elif kind == "ident":
            nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
            if braces or label_list_at is not None:
                found.labels.add(text)
            elif text in LABEL_LIST_KEYWORDS and nxt == "(":
                label_list_at = parens + 1
            else:
                _add_name(found, text, nxt)
    return found


def _add_name(found: Names, text: str, nxt: str) -> None:
    if text.lower() in KEYWORDS:
        return
    if nxt == "(" or (text in AGGREGATIONS and nxt in ("by", "without")):
        found.functions.add(text)
    else:
        found.metrics.add(text)


def _tokenize(expr: str) -> list[tuple[str, str]]:
    tokens = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read PromQL at {pos}: {expr[pos : pos + 30]!r}")
        pos = match.end()
        kind = match.lastgroup or ""
        if kind != "space":
            tokens.append((kind, match.group()))
    return tokens


@dataclass(frozen=True)
class Metric:
    name: str
    type: str
    labels: frozenset[str]


def load_metric_names(path: Path) -> dict[str, Metric]:
    """deploy/metric_names.txt: `NAME TYPE LABEL,LABEL` per line, `#` comments."""
    metrics = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, kind, labels = line.split()
        metrics[name] = Metric(name, kind, frozenset(labels.split(",")))
    return metrics


def series_names(metrics: dict[str, Metric]) -> dict[str, Metric]:
    """Every series name a scrape holds: histograms add _bucket, _sum and _count."""
    out = dict(metrics)
    for m in metrics.values():
        if m.type == "histogram":
            out[f"{m.name}_bucket"] = Metric(f"{m.name}_bucket", "counter", m.labels | {"le"})
            out[f"{m.name}_sum"] = Metric(f"{m.name}_sum", "counter", m.labels)
            out[f"{m.name}_count"] = Metric(f"{m.name}_count", "counter", m.labels)
    return out
