"""PromQL evaluation over series of samples, with Prometheus's own semantics (the subset dashboards use).

Pure and synchronous: :func:`selectors` lists what an expression reads, the caller fetches those series once
(app/api/prometheus/model.py maps stored minutes onto samples), and :func:`evaluate` runs the expression at
every step. An instant selector at time ``t`` takes each series' newest sample in ``(t - lookback, t]`` after
its offset; a range ``[r]`` takes the samples in ``(t - r, t]``, as Prometheus does.
Reference: docs/prometheus.md
"""

from __future__ import annotations

import heapq
import math
import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import promql_parser as pq

Labels = tuple[tuple[str, str], ...]
"""A series' labels, sorted by name (``__name__`` included while the metric name is kept)."""
NAME = "__name__"


class QueryError(Exception):
    """A Prometheus-shaped error: ``kind`` is its ``errorType`` (bad_data -> 400, execution -> 422)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def bad_data(message: str) -> QueryError:
    return QueryError("bad_data", message)


def unsupported(what: str) -> QueryError:
    return QueryError("execution", f"{what} is not supported by minutely's PromQL (docs/prometheus.md lists "
                                   "what is)")


@dataclass(frozen=True, slots=True)
class Selector:
    """What one vector selector reads: its name and matchers, and how far back of each step."""

    name: str | None
    matchers: tuple[tuple[str, str, str], ...]
    """(label, op, value), op one of = != =~ !~."""
    offset_s: float
    range_s: float
    """0 for an instant selector (then the lookback applies)."""

    def matches(self, labels: dict[str, str], only: tuple[str, ...] | None = None) -> bool:
        """Every matcher holds for ``labels`` (with ``only``: every matcher of those labels)."""
        for label, op, value in self.matchers:
            if only is not None and label not in only:
                continue
            have = labels.get(label, "")
            if op == "=":
                ok = have == value
            elif op == "!=":
                ok = have != value
            else:
                ok = _regex(value).fullmatch(have) is not None
                if op == "!~":
                    ok = not ok
            if not ok:
                return False
        return True


Series = dict[Labels, tuple[list[float], list[float]]]
"""labels -> (timestamps in s ascending, values)."""


def parse(query: str) -> Any:
    try:
        return pq.parse(query)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise bad_data(f"invalid parameter \"query\": {exc}") from None


def selector_of(node: Any, range_s: float = 0.0) -> Selector:
    if node.at is not None:
        raise unsupported("the @ modifier")
    matchers = []
    name = node.name
    for m in node.matchers.matchers:
        op = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}[str(m.op)]
        if m.name == NAME and op == "=":
            name = m.value
        else:
            matchers.append((m.name, op, m.value))
    if node.matchers.or_matchers:
        raise unsupported("the `or` of matchers")
    offset_s = node.offset.total_seconds() if node.offset is not None else 0.0
    return Selector(name, tuple(matchers), offset_s, range_s)


def selectors(expr: Any) -> list[Selector]:
    """Every selector ``expr`` reads (a range selector with its range)."""
    out: list[Selector] = []

    def walk(node: Any) -> None:
        t = type(node)
        if t is pq.VectorSelector:
            out.append(selector_of(node))
        elif t is pq.MatrixSelector:
            out.append(selector_of(node.vector_selector, node.range.total_seconds()))
        elif t is pq.Call:
            for a in node.args:
                walk(a)
        elif t is pq.AggregateExpr:
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif t is pq.BinaryExpr:
            walk(node.lhs)
            walk(node.rhs)
        elif t in (pq.UnaryExpr, pq.ParenExpr):
            walk(node.expr)
        elif t is pq.SubqueryExpr:
            raise unsupported("subqueries")
    walk(expr)
    return out


# --- values -------------------------------------------------------------------------------------------
Vector = dict[Labels, float]


@dataclass(slots=True)
class Scalar:
    value: float


@dataclass(slots=True)
class String:
    value: str


Value = Vector | Scalar | String


class Evaluator:
    """Evaluates one parsed expression at a time ``t`` (epoch s) over fetched series."""

    def __init__(self, fetched: dict[Selector, Series], *, lookback_s: float) -> None:
        self.fetched = fetched
        self.lookback_s = lookback_s

    def eval(self, node: Any, t: float) -> Value:
        kind = type(node)
        handler = _HANDLERS.get(kind)
        if handler is None:
            raise unsupported(kind.__name__)
        return handler(self, node, t)

    # --- leaves
    def _number(self, node: Any, t: float) -> Value:
        return Scalar(float(node.val))

    def _string(self, node: Any, t: float) -> Value:
        return String(str(node.val))

    def _vector(self, node: Any, t: float) -> Value:
        sel = selector_of(node)
        at = t - sel.offset_s
        out: Vector = {}
        for labels, (ts, vs) in self.fetched.get(sel, {}).items():
            i = bisect_right(ts, at) - 1
            if i >= 0 and ts[i] > at - self.lookback_s:
                out[labels] = vs[i]
        return out

    def _range(self, sel: Selector, t: float) -> list[tuple[Labels, list[float]]]:
        at = t - sel.offset_s
        out = []
        for labels, (ts, vs) in self.fetched.get(sel, {}).items():
            hi = bisect_right(ts, at)
            lo = bisect_right(ts, at - sel.range_s)
            if hi > lo:
                out.append((labels, vs[lo:hi]))
        return out

    def _paren(self, node: Any, t: float) -> Value:
        return self.eval(node.expr, t)

    def _unary(self, node: Any, t: float) -> Value:
        v = self.eval(node.expr, t)
        if isinstance(v, Scalar):
            return Scalar(-v.value)
        if isinstance(v, String):
            raise bad_data("unary minus on a string")
        return {_drop_name(k): -x for k, x in v.items()}

    # --- functions
    def _call(self, node: Any, t: float) -> Value:
        name = node.func.name
        args = node.args
        if name == "time":
            return Scalar(float(t))
        if name in OVER_TIME:
            arg = args[0]
            if type(arg) is not pq.MatrixSelector:
                raise bad_data(f"{name} expects a range vector")
            sel = selector_of(arg.vector_selector, arg.range.total_seconds())
            f = OVER_TIME[name]
            return {_drop_name(k) if name != "last_over_time" else k: f(vs) for k, vs in self._range(sel, t)}
        if name == "absent":
            v = self.eval(args[0], t)
            if not isinstance(v, dict):
                raise bad_data("absent expects an instant vector")
            if v:
                return {}
            labels: dict[str, str] = {}
            if type(args[0]) is pq.VectorSelector:
                for label, op, value in selector_of(args[0]).matchers:
                    if op == "=":
                        labels[label] = value
            return {_labels(labels): 1.0}
        if name in SIMPLE:
            v = self.eval(args[0], t)
            if not isinstance(v, dict):
                raise bad_data(f"{name} expects an instant vector")
            return {_drop_name(k): SIMPLE[name](x) for k, x in v.items()}
        if name == "scalar":
            v = self.eval(args[0], t)
            if not isinstance(v, dict):
                raise bad_data("scalar expects an instant vector")
            return Scalar(next(iter(v.values())) if len(v) == 1 else math.nan)
        if name == "vector":
            v = self.eval(args[0], t)
            if not isinstance(v, Scalar):
                raise bad_data("vector expects a scalar")
            return {(): v.value}
        raise unsupported(f"the function {name}()")

    # --- aggregations
    def _aggregate(self, node: Any, t: float) -> Value:
        op = str(node.op)
        v = self.eval(node.expr, t)
        if not isinstance(v, dict):
            raise bad_data(f"{op} expects an instant vector")
        mod = node.modifier
        by = None if mod is None else list(mod.labels)
        without = mod is not None and str(mod.type) == "AggModifierType.Without"

        def group_of(labels: Labels) -> Labels:
            d = dict(labels)
            if mod is None:
                return ()
            if without:
                return _labels({k: x for k, x in d.items() if k not in by and k != NAME})  # type: ignore[operator]
            return _labels({k: d[k] for k in by if k in d})  # type: ignore[union-attr]

        if op in ("topk", "bottomk"):
            param = self.eval(node.param, t)
            if not isinstance(param, Scalar):
                raise bad_data(f"{op} expects a scalar k")
            k = int(param.value)
            groups: dict[Labels, list[tuple[Labels, float]]] = {}
            for labels, x in v.items():
                groups.setdefault(group_of(labels), []).append((labels, x))
            out: Vector = {}
            for members in groups.values():
                pick = heapq.nlargest if op == "topk" else heapq.nsmallest
                key: Callable[[tuple[Labels, float]], float] = (
                    (lambda m: -math.inf if math.isnan(m[1]) else m[1]) if op == "topk"
                    else (lambda m: math.inf if math.isnan(m[1]) else m[1]))
                for labels, x in pick(max(k, 0), members, key=key):
                    out[labels] = x
            return out
        fold = AGGREGATIONS.get(op)
        if fold is None:
            raise unsupported(f"the aggregation {op}")
        buckets: dict[Labels, list[float]] = {}
        for labels, x in v.items():
            buckets.setdefault(group_of(labels), []).append(x)
        return {g: fold(xs) for g, xs in buckets.items()}

    # --- binary operators
    def _binary(self, node: Any, t: float) -> Value:
        op = str(node.op)
        lhs, rhs = self.eval(node.lhs, t), self.eval(node.rhs, t)
        mod = node.modifier
        return_bool = mod is not None and mod.return_bool
        if op in ("and", "or", "unless"):
            raise unsupported(f"the set operator {op}")
        if isinstance(lhs, String) or isinstance(rhs, String):
            raise bad_data("binary operators take numbers or vectors, not strings")
        f = ARITHMETIC.get(op)
        compare = COMPARISONS.get(op)
        if isinstance(lhs, Scalar) and isinstance(rhs, Scalar):
            if compare is not None:
                return Scalar(1.0 if compare(lhs.value, rhs.value) else 0.0)
            assert f is not None
            return Scalar(f(lhs.value, rhs.value))
        if isinstance(lhs, Scalar) or isinstance(rhs, Scalar):
            vec, scalar, vec_left = ((rhs, lhs, False) if isinstance(lhs, Scalar) else (lhs, rhs, True))
            assert isinstance(vec, dict) and isinstance(scalar, Scalar)
            out: Vector = {}
            for labels, x in vec.items():
                a, b = (x, scalar.value) if vec_left else (scalar.value, x)
                if compare is not None:
                    hit = compare(a, b)
                    if return_bool:
                        out[_drop_name(labels)] = 1.0 if hit else 0.0
                    elif hit:
                        out[labels] = x
                else:
                    assert f is not None
                    out[_drop_name(labels)] = f(a, b)
            return out
        assert isinstance(lhs, dict) and isinstance(rhs, dict)
        matching = None if mod is None else mod.matching
        if mod is not None and str(mod.card) != "VectorMatchCardinality.OneToOne":
            raise unsupported("group_left / group_right")
        on = matching is not None and str(matching.type) == "LabelModifierType.Include"
        keys = () if matching is None else tuple(matching.labels)

        def signature(labels: Labels) -> Labels:
            if on:
                return tuple((k, x) for k, x in labels if k in keys)
            return tuple((k, x) for k, x in labels if k not in keys and k != NAME)

        right: dict[Labels, tuple[Labels, float]] = {}
        for labels, x in rhs.items():
            sig = signature(labels)
            if sig in right:
                raise QueryError("execution", "found duplicate series for the match group on the right hand-side "
                                              "of the operation: many-to-many matching not allowed")
            right[sig] = (labels, x)
        out = {}
        seen: set[Labels] = set()
        for labels, x in lhs.items():
            sig = signature(labels)
            other = right.get(sig)
            if other is None:
                continue
            if sig in seen:
                raise QueryError("execution", "multiple matches for labels: many-to-one matching must be explicit "
                                              "(group_left/group_right)")
            seen.add(sig)
            y = other[1]
            result = _result_labels(labels, on, keys, drop_name=compare is None or return_bool)
            if compare is not None:
                hit = compare(x, y)
                if return_bool:
                    out[result] = 1.0 if hit else 0.0
                elif hit:
                    out[result] = x
            else:
                assert f is not None
                out[result] = f(x, y)
        return out


_HANDLERS: dict[type, Callable[[Evaluator, Any, float], Value]] = {
    pq.NumberLiteral: Evaluator._number, pq.StringLiteral: Evaluator._string,
    pq.VectorSelector: Evaluator._vector, pq.ParenExpr: Evaluator._paren, pq.UnaryExpr: Evaluator._unary,
    pq.Call: Evaluator._call, pq.AggregateExpr: Evaluator._aggregate, pq.BinaryExpr: Evaluator._binary,
}


def _result_labels(labels: Labels, on: bool, keys: Sequence[str], *, drop_name: bool) -> Labels:
    """A one-to-one match's result: the left side's labels, cut to ``on`` (or without ``ignoring``)."""
    if on:
        return tuple((k, x) for k, x in labels if k in keys)
    return tuple((k, x) for k, x in labels if k not in keys and not (drop_name and k == NAME))


def _drop_name(labels: Labels) -> Labels:
    return tuple(kv for kv in labels if kv[0] != NAME)


def _labels(d: dict[str, str]) -> Labels:
    return tuple(sorted(d.items()))


_REGEX_CACHE: dict[str, re.Pattern[str]] = {}


def _regex(value: str) -> re.Pattern[str]:
    pattern = _REGEX_CACHE.get(value)
    if pattern is None:
        try:
            pattern = re.compile(value, re.DOTALL)
        except re.error as exc:
            raise bad_data(f"invalid regular expression {value!r}: {exc}") from None
        if len(_REGEX_CACHE) > 1024:
            _REGEX_CACHE.clear()
        _REGEX_CACHE[value] = pattern
    return pattern


def _div(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


def _mod(a: float, b: float) -> float:
    return math.nan if b == 0 else math.fmod(a, b)


def _pow(a: float, b: float) -> float:
    try:
        return float(a ** b) if not (a < 0 and not float(b).is_integer()) else math.nan
    except OverflowError:
        return math.inf
    except ZeroDivisionError:
        return math.inf


ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": _div, "%": _mod, "^": _pow,
}
COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "==": lambda a, b: a == b, "!=": lambda a, b: a != b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
    ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b,
}


def _avg(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def _nan_min(xs: Sequence[float]) -> float:
    real = [x for x in xs if not math.isnan(x)]
    return min(real) if real else math.nan


def _nan_max(xs: Sequence[float]) -> float:
    real = [x for x in xs if not math.isnan(x)]
    return max(real) if real else math.nan


AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "sum": lambda xs: math.fsum(xs), "avg": _avg, "min": _nan_min, "max": _nan_max,
    "count": lambda xs: float(len(xs)),
}
OVER_TIME: dict[str, Callable[[Sequence[float]], float]] = {
    "sum_over_time": lambda xs: math.fsum(xs), "avg_over_time": _avg, "min_over_time": _nan_min,
    "max_over_time": _nan_max, "count_over_time": lambda xs: float(len(xs)),
    "last_over_time": lambda xs: xs[-1],
}
SIMPLE: dict[str, Callable[[float], float]] = {
    "abs": abs, "ceil": lambda x: x if not math.isfinite(x) else float(math.ceil(x)),
    "floor": lambda x: x if not math.isfinite(x) else float(math.floor(x)),
}


def format_value(v: float) -> str:
    """As Prometheus writes a sample: the shortest decimal, never an exponent; NaN, +Inf, -Inf."""
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    text = repr(v)
    if "e" in text or "E" in text:
        text = format(Decimal(text), "f")
    return text[:-2] if text.endswith(".0") else text

