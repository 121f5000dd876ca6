"""Figures and their formatting: goals, percentiles, ratios, CPU per call, table cells."""

import math
import statistics
from dataclasses import dataclass

from rich.table import Table

from bench.machine import CLOCK_TICK

SECOND_NS = 1_000_000_000


@dataclass(frozen=True)
class Goal:
    """One figure we hold ourselves to: its key, its limit and which side of it is good."""

    key: str
    label: str
    limit: float
    at_most: bool = True
    unit: str = ""
    strict: bool = False

    def met(self, value):
        """True or False, or None when the figure was not measured."""
        if value is None:
            return None
        if self.strict:
            return value < self.limit if self.at_most else value > self.limit
        return value <= self.limit if self.at_most else value >= self.limit

    def describe(self):
        """The target as a reader would say it, e.g. '≤ 1.3×'."""
        sign = ("<" if self.at_most else ">") if self.strict else ("≤" if self.at_most else "≥")
        return f"{sign} {self.limit:g}{self.unit}"


def verdicts(goals, figures):
    """Each goal's target, value and whether it is met, for the JSON."""
    return {
        goal.key: {"target": goal.describe(), "value": figures.get(goal.key),
                   "met": goal.met(figures.get(goal.key))}
        for goal in goals
    }


def percentile(values, fraction):
    """Nearest-rank percentile of values (unsorted is fine); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def ms(ns):
    """Nanoseconds as milliseconds; None stays None."""
    return None if ns is None else ns / 1e6


def latency_figures(latencies_ns):
    """p50, p99 and max in milliseconds."""
    ordered = sorted(latencies_ns)
    return {
        "p50_ms": ms(percentile(ordered, 0.50)),
        "p99_ms": ms(percentile(ordered, 0.99)),
        "max_ms": ms(ordered[-1] if ordered else None),
    }


def ratio(value, base):
    """value / base, or None when either is missing or base is zero."""
    if value is None or not base:
        return None
    return value / base


def median(values):
    """Median of the values that were measured; None when none were."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def rotate(items, by):
    """items turned left by `by`, so each round starts with another target."""
    by %= len(items)
    return list(items[by:]) + list(items[:by])


def split(total, parts):
    """total as `parts` nearly equal counts."""
    return [total // parts + (1 if part < total % parts else 0) for part in range(parts)]


def slope(points):
    """Least-squares slope of (x, y) points; None for fewer than two distinct x."""
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if not spread:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def cpu_figures(before, after, calls, seconds):
    """Server and client CPU per call (us) and the cores other processes used (noise; the
    store's engine is not noise, it works for the server)."""
    server = after.server - before.server
    load = after.load - before.load
    engine = after.engine - before.engine
    others = ((after.machine - before.machine) - server - load - engine
              - (after.own - before.own))
    per_call = 1e6 / CLOCK_TICK / calls if calls else None
    return {
        "server_cpu_s": server / CLOCK_TICK,
        "cpu_us_per_call": server * per_call if per_call else None,
        "client_cpu_us_per_call": load * per_call if per_call else None,
        "server_cores": server / CLOCK_TICK / seconds,
        "load_cores": load / CLOCK_TICK / seconds,
        "noise_cores": max(others, 0) / CLOCK_TICK / seconds,
    }


def fmt(value, digits=1, thousands=False):
    """A number for a table cell; a dash when it was not measured."""
    if value is None:
        return "—"
    if thousands:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def fmt_ratio(value):
    """A ratio for a table cell, e.g. '1.23×'."""
    return "—" if value is None else f"{value:.2f}×"


def mark(goal, value):
    """✓, ✗, or ? when the figure was not measured."""
    met = goal.met(value)
    return "[dim]?[/]" if met is None else "[green]✓[/]" if met else "[red]✗[/]"


def fmt_errors(errors):
    """Errors by code, e.g. 'CANCELLED 3'; '0' for none."""
    return ", ".join(f"{code} {count}" for code, count in sorted(errors.items())) or "0"


def checked(goals, figures, key, text):
    """A table cell: text and the mark of the goal for figures[key]."""
    return f"{text} {mark(goals[key], figures[key])}"


def figure_table(title):
    """A table of one figure a row: its name, its value, its goal."""
    table = Table(title=title)
    for header in ("figure", "value", "goal"):
        table.add_column(header, justify="right" if header == "value" else "left")
    return table


def cores_rows(table, figures):
    """The rows that say who kept the cores busy: the server, the load, everyone else."""
    table.add_row("server cores busy", fmt(figures["server_cores"], 2), "")
    table.add_row("load processes' cores busy", fmt(figures["load_cores"], 2), "")
    table.add_row("other processes' cores (noise)", fmt(figures["noise_cores"], 2), "")


def outcome_rows(table, goals, figures, at=""):
    """Errors and latencies of a load's calls, each beside its goal (set at `at`)."""
    table.add_row("errors", checked(goals, figures, "error_count", fmt_errors(figures["errors"])),
                  f"zero errors{at}")
    table.add_row("p50 ms", fmt(figures["p50_ms"], 2), "")
    table.add_row("p99 ms", checked(goals, figures, "p99_ms", fmt(figures["p99_ms"], 2)),
                  f"{goals['p99_ms'].describe()}{at}")
    table.add_row("max ms", fmt(figures["max_ms"], 1), "")
