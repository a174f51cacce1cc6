"""Geometry of the site's inline SVG charts; the templates draw them (every text autoescaped).

Each builder returns plain numbers and strings: positions in SVG user units, tick labels,
tooltip titles. The blocking and ablation charts carry their own colours and fonts as
attributes, so a saved SVG is a figure on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Okabe-Ito colours (colour-blind safe) and dash patterns (tell lines apart in greyscale print).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999")
DASHES = ("", "7 3", "2 2", "9 3 2 3", "4 4", "1 3", "12 4", "6 2 2 2")


@dataclass(frozen=True)
class Frame:
    """A chart's SVG size and its plot area: `plot_w` x `plot_h` at (`left`, `top`)."""

    width: int
    height: int
    left: int
    top: int
    plot_w: int
    plot_h: int

    def geometry(self) -> dict[str, Any]:
        """The keys every chart's geometry starts with; the templates draw the frame and axes from them."""
        return {
            "width": self.width,
            "height": self.height,
            "left": self.left,
            "top": self.top,
            "plot_w": self.plot_w,
            "plot_h": self.plot_h,
            "bottom_y": self.top + self.plot_h,
        }


def _frame(width: int, height: int, *, left: int, right: int, top: int, bottom: int) -> Frame:
    """The frame of a `width` x `height` chart with these margins."""
    return Frame(width, height, left, top, width - left - right, height - top - bottom)


def error_bar(x: float, low: float | None, high: float | None, y_of: Any) -> dict[str, Any] | None:
    """A vertical 95% interval whisker at x (SVG coordinates and the bounds); None without bounds."""
    if low is None or high is None:
        return None
    return {"x": x, "y_low": round(y_of(low), 2), "y_high": round(y_of(high), 2), "low": low, "high": high}


def _dodge(index: int, count: int, step: float = 2.5) -> float:
    """Horizontal offset of series `index` of `count` for whiskers, so that intervals of
    lines sharing an x stay apart (the points themselves stay at their x)."""
    return (index - (count - 1) / 2) * step


def layer_share_chart(
    series: list[tuple[str, list[float], str]],
    n_layers: int,
    *,
    width: int = 640,
    height: int = 260,
    y_label: str = "share of object-patch positions",
    intervals: list[tuple[list[float | None], list[float | None]] | None] | None = None,
    n_notes: list[str] | None = None,
) -> dict[str, Any]:
    """Geometry of an inline SVG line chart (rendered by a template; all text autoescaped).

    `series` is [(name, values per layer, css class)]; y runs 0..max (at least 0.05).
    `intervals`, aligned with `series`, gives each series' (lows, highs) per layer, drawn
    as whiskers; `n_notes`, aligned too, says in every point's tooltip what n is.
    """
    frame = _frame(width, height, left=52, right=12, top=12, bottom=36)
    left, top, plot_w, plot_h = frame.left, frame.top, frame.plot_w, frame.plot_h
    bounds = intervals or [None] * len(series)
    notes = n_notes or [""] * len(series)
    highs = [h for b in bounds if b is not None for h in b[1] if h is not None]
    y_max = max([0.05] + [v for _, values, _ in series for v in values] + highs)
    y_max = float(np.ceil(y_max * 25 - 1e-9) / 25)  # a multiple of 4 %, so the quarter ticks are whole percents

    def x_of(layer: int) -> float:
        return left + (plot_w * layer / max(1, n_layers - 1))

    def y_of(value: float) -> float:
        return top + plot_h * (1 - value / y_max)

    lines = []
    for k, ((name, values, css), bound, note) in enumerate(zip(series, bounds, notes)):
        points = " ".join(f"{x_of(i):.1f},{y_of(v):.1f}" for i, v in enumerate(values))
        dots = []
        for i, v in enumerate(values):
            low, high = (bound[0][i], bound[1][i]) if bound is not None else (None, None)
            interval = f", 95% CI {100 * low:.1f}–{100 * high:.1f}%" if low is not None and high is not None else ""
            dots.append(
                {
                    "x": round(x_of(i), 1),
                    "y": round(y_of(v), 1),
                    "ci": error_bar(round(x_of(i) + _dodge(k, len(series)), 2), low, high, y_of),
                    "title": f"{name}, layer {i}: {100 * v:.1f}%{interval}" + (f" ({note})" if note else ""),
                }
            )
        lines.append({"name": name, "points": points, "css": css, "dots": dots})
    step = max(1, int(np.ceil(n_layers / 12)))
    x_ticks = [{"x": round(x_of(i), 1), "label": str(i)} for i in range(0, n_layers, step)]
    y_ticks = [{"y": round(y_of(y_max * f), 1), "label": f"{100 * y_max * f:.0f}%"} for f in (0, 0.25, 0.5, 0.75, 1)]
    return {
        **frame.geometry(),
        "lines": lines,
        "x_ticks": x_ticks,
        "y_ticks": y_ticks,
        "y_label": y_label,
    }


def flip_rate_bar_chart(
    rows: list[dict[str, Any]], y_max: float, *, width: int = 640, height: int = 300
) -> dict[str, Any]:
    """Geometry of one setting's bar chart: one bar per `ablation_summary` row (% flipped).

    `y_max` (percent) is shared by the charts of a run so their bars compare. Every text
    is rendered by the template (autoescaped); the SVG carries its own colours and fonts
    so it can be saved and used as a figure on its own.
    """
    # top: room for the value and n above a full bar
    frame = _frame(width, height, left=52, right=12, top=34, bottom=92)
    left, top, plot_w, plot_h = frame.left, frame.top, frame.plot_w, frame.plot_h
    slot = plot_w / max(1, len(rows))
    bar_w = min(44.0, slot * 0.7)
    bars = []

    def y_of(pct: float) -> float:
        return top + plot_h * (1 - min(pct, y_max) / y_max)

    for i, row in enumerate(rows):
        pct = row["pct_flipped"]
        h = plot_h * min(pct, y_max) / y_max
        cx = left + slot * (i + 0.5)
        low, high = row.get("pct_flipped_ci_low"), row.get("pct_flipped_ci_high")
        interval = f"; 95% Wilson CI {low:.1f}–{high:.1f}%" if low is not None and high is not None else ""
        bars.append(
            {
                "x": round(cx - bar_w / 2, 2),
                "y": round(top + plot_h - h, 2),
                "w": round(bar_w, 2),
                "h": round(h, 2),
                "cx": round(cx, 2),
                "label_y": round(min(top + plot_h - h, y_of(high) if high is not None else top + plot_h) - 4, 2),
                "value": f"{pct:.1f}",
                "n": row["n_baseline_correct"],
                "ci": error_bar(round(cx, 2), low, high, y_of),
                "condition": row["condition"],
                "title": (
                    f"{row['setting']} / {row['condition']}: {row['n_flipped']} of {row['n_baseline_correct']} "
                    f"baseline-correct answers flipped ({pct:.2f}%{interval}, n = {row['n_baseline_correct']}); "
                    f"mean {row['mean_tokens_ablated']:.2f} tokens ablated"
                ),
            }
        )
    ticks = [{"y": round(top + plot_h * (1 - f), 2), "label": f"{y_max * f:g}%"} for f in (0, 0.25, 0.5, 0.75, 1)]
    return {
        **frame.geometry(),
        "bars": bars,
        "y_max": y_max,
        "y_ticks": ticks,
    }


def flip_rate_y_max(summary: list[dict[str, Any]]) -> float:
    """A shared y range for a run's charts: the largest % flipped (or interval top) rounded up to 10, at least 10."""
    top = max(
        [
            max(row["pct_flipped"], row.get("pct_flipped_ci_high") or 0.0)
            for row in summary
            if row["condition"] != "none"
        ],
        default=0.0,
    )
    return float(min(100, max(10, -(-top // 10) * 10)))


def _nice_ceiling(value: float) -> float:
    if not value > 0:
        return 1.0
    # Steps whose quarters are round numbers (the y ticks sit at quarters).
    scale = 10 ** math.floor(math.log10(value))
    step = next(m for m in (1, 1.2, 1.6, 2, 4, 6, 8, 10) if m * scale >= value * (1 - 1e-9))
    return round(step * scale, 12)


def blocking_curve_chart(
    curve: dict[str, Any],
    measure: str,
    *,
    y_label: str,
    width: int = 640,
    height: int = 300,
    reference: float | None = None,
) -> dict[str, Any]:
    """Geometry of one blocking-curve chart: x = window start layer, one line per source set.

    `curve` is one entry of a blocking page's `curves`; `measure` one of its series keys.
    None values leave gaps (a line is split there). `empty` is True when no series has any value (e.g. relative
    accuracy where the baseline accuracy is 0); the template then says so. The legend sits
    inside the SVG and every colour and font is an attribute, so the SVG is a figure on
    its own.
    """
    frame = _frame(width, height, left=64, right=12 + 172, top=14, bottom=40)  # right: room for the legend
    left, top, plot_w, plot_h = frame.left, frame.top, frame.plot_w, frame.plot_h
    x_values = curve["x"]
    values = [v for series in curve["series"] for v in series[measure] if v is not None]
    highs = [v for series in curve["series"] for v in series.get(f"{measure}_ci_high", []) if v is not None]
    y_max = _nice_ceiling(max(values + highs + ([reference] if reference is not None else []), default=0.0))
    x_min, x_max = (min(x_values), max(x_values)) if x_values else (0, 1)

    def x_of(x: float) -> float:
        if x_max == x_min:
            return left + plot_w / 2
        return left + plot_w * (x - x_min) / (x_max - x_min)

    def y_of(y: float) -> float:
        return top + plot_h * (1 - y / y_max)

    lines = []
    for i, series in enumerate(curve["series"]):
        segments: list[Any] = []
        current: list[Any] = []
        dots: list[Any] = []
        for j, x in enumerate(x_values):
            value = series[measure][j]
            if value is None:
                if current:
                    segments.append(current)
                current = []
                continue
            point = (round(x_of(x), 2), round(y_of(value), 2))
            current.append(point)
            end = curve["window_ends"][j]
            accuracy = series["accuracy"][j]
            low = (series.get(f"{measure}_ci_low") or [None] * len(x_values))[j]
            high = (series.get(f"{measure}_ci_high") or [None] * len(x_values))[j]
            interval = f", 95% CI {low:.4g}–{high:.4g}" if low is not None and high is not None else ""
            dots.append(
                {
                    "x": point[0],
                    "y": point[1],
                    "ci": error_bar(round(point[0] + _dodge(i, len(curve["series"])), 2), low, high, y_of),
                    "n": series["n"][j],
                    "title": (
                        f"{series['source']}, layers {x}–{end}: {y_label} {value:.4g}{interval} "
                        f"(accuracy {accuracy:.4g}, n = {series['n'][j]} images)"
                        if accuracy is not None
                        else f"{series['source']}, layers {x}–{end}: {y_label} {value:.4g}{interval} "
                        f"(n = {series['n'][j]} images)"
                    ),
                }
            )
        if current:
            segments.append(current)
        lines.append(
            {
                "name": series["source"],
                "color": PALETTE[i % len(PALETTE)],
                "dash": DASHES[i % len(DASHES)],
                "segments": [" ".join(f"{x},{y}" for x, y in seg) for seg in segments],
                "dots": dots,
                "legend_y": top + 10 + 20 * i,
            }
        )
    step = max(1, math.ceil(len(x_values) / 16))
    x_ticks = [{"x": round(x_of(x), 2), "label": str(x)} for x in x_values[::step]]
    y_ticks = [{"y": round(y_of(y_max * f), 2), "label": f"{y_max * f:.4g}"} for f in (0, 0.25, 0.5, 0.75, 1)]
    return {
        **frame.geometry(),
        "legend_x": left + plot_w + 18,
        "y_max": y_max,
        "lines": lines,
        "x_ticks": x_ticks,
        "y_ticks": y_ticks,
        "y_label": y_label,
        "empty": not values,
        "reference_y": round(y_of(reference), 2) if reference is not None and values else None,
    }


def relative_depth_chart(
    series: list[dict[str, Any]],
    *,
    y_label: str,
    percent: bool = False,
    width: int = 640,
    height: int = 300,
    reference: float | None = None,
) -> dict[str, Any]:
    """Geometry of a chart of several runs on one relative-depth axis (report/pages/depth.py).

    `series`: one dict per run, with `key` (the run's toggle key), `name`, `color`, `dash`
    and `points`, each {depth (0..1), value (None: no point), low, high (None: no
    whisker), n, where (e.g. "layer 3 of 8")}. x = left + plot_w * depth, so every run,
    whatever its number of layers, spans the same axis; y runs 0..y_max. `percent` prints
    values as percentages. A line is broken where a value is None.
    """
    frame = _frame(width, height, left=64, right=14, top=14, bottom=42)
    left, top, plot_w, plot_h = frame.left, frame.top, frame.plot_w, frame.plot_h
    values = [p["value"] for s in series for p in s["points"] if p["value"] is not None]
    highs = [p["high"] for s in series for p in s["points"] if p.get("high") is not None]
    y_max = _nice_ceiling(max(values + highs + ([reference] if reference is not None else []), default=0.0))

    def x_of(depth: float) -> float:
        return left + plot_w * depth

    def y_of(value: float) -> float:
        return top + plot_h * (1 - value / y_max)

    def show(value: float) -> str:
        return f"{100 * value:.1f}%" if percent else f"{value:.3g}"

    lines = []
    for i, s in enumerate(series):
        segments: list[list[tuple[float, float]]] = []
        current: list[tuple[float, float]] = []
        dots = []
        for p in s["points"]:
            if p["value"] is None:
                if current:
                    segments.append(current)
                current = []
                continue
            x, y = round(x_of(p["depth"]), 2), round(y_of(p["value"]), 2)
            current.append((x, y))
            low, high = p.get("low"), p.get("high")
            interval = f", 95% CI {show(low)}–{show(high)}" if low is not None and high is not None else ""
            dots.append(
                {
                    "x": x,
                    "y": y,
                    "depth": p["depth"],
                    "n": p["n"],
                    "ci": error_bar(round(x + _dodge(i, len(series)), 2), low, high, y_of),
                    "title": (
                        f"{s['name']}: {p['where']}, relative depth {p['depth']:.3f}: {y_label} "
                        f"{show(p['value'])}{interval} (n = {p['n']})"
                    ),
                }
            )
        if current:
            segments.append(current)
        lines.append(
            {
                "key": s["key"],
                "name": s["name"],
                "color": s["color"],
                "dash": s["dash"],
                "segments": [" ".join(f"{x},{y}" for x, y in seg) for seg in segments],
                "dots": dots,
            }
        )
    x_ticks = [{"x": round(x_of(f), 2), "label": f"{f:g}"} for f in (0, 0.25, 0.5, 0.75, 1)]
    y_ticks = [
        {"y": round(y_of(y_max * f), 2), "label": f"{100 * y_max * f:.0f}%" if percent else f"{y_max * f:.4g}"}
        for f in (0, 0.25, 0.5, 0.75, 1)
    ]
    return {
        **frame.geometry(),
        "y_max": y_max,
        "y_label": y_label,
        "lines": lines,
        "x_ticks": x_ticks,
        "y_ticks": y_ticks,
        "empty": not values,
        "reference_y": round(y_of(reference), 2) if reference is not None and values else None,
    }


def grouped_bar_chart(
    groups: list[str],
    series: list[dict[str, Any]],
    *,
    y_label: str,
    width: int = 720,
    height: int = 320,
) -> dict[str, Any]:
    """Geometry of a grouped bar chart: one group per x label, one bar per series (run) in it.

    `series`: dicts with `key`, `name`, `color` and `values`: {group: {value, low, high, n,
    title}} (percentages); a series without a group has no bar there. Whiskers from low to
    high; y runs 0..y_max (a multiple of 10, at least 10, at most 100).
    """
    frame = _frame(width, height, left=56, right=12, top=30, bottom=92)
    left, top, plot_w, plot_h = frame.left, frame.top, frame.plot_w, frame.plot_h
    tops = [max(v["value"], v.get("high") or 0.0) for s in series for v in s["values"].values()]
    y_max = float(min(100, max(10, -(-max(tops, default=0.0) // 10) * 10)))

    def y_of(value: float) -> float:
        return top + plot_h * (1 - min(value, y_max) / y_max)

    slot = plot_w / max(1, len(groups))
    bar_w = min(28.0, slot * 0.8 / max(1, len(series)))
    bars = []
    for g, group in enumerate(groups):
        start = left + slot * g + (slot - bar_w * len(series)) / 2
        for i, s in enumerate(series):
            v = s["values"].get(group)
            if v is None:
                continue
            x = start + bar_w * i
            bars.append(
                {
                    "key": s["key"],
                    "group": group,
                    "color": s["color"],
                    "x": round(x, 2),
                    "y": round(y_of(v["value"]), 2),
                    "w": round(bar_w * 0.9, 2),
                    "h": round(top + plot_h - y_of(v["value"]), 2),
                    "cx": round(x + bar_w * 0.45, 2),
                    "n": v["n"],
                    "value": v["value"],
                    "ci": error_bar(round(x + bar_w * 0.45, 2), v.get("low"), v.get("high"), y_of),
                    "title": v["title"],
                }
            )
    group_labels = [{"x": round(left + slot * (g + 0.5), 2), "label": group} for g, group in enumerate(groups)]
    y_ticks = [{"y": round(y_of(y_max * f), 2), "label": f"{y_max * f:g}%"} for f in (0, 0.25, 0.5, 0.75, 1)]
    return {
        **frame.geometry(),
        "y_max": y_max,
        "y_label": y_label,
        "bars": bars,
        "group_labels": group_labels,
        "y_ticks": y_ticks,
    }
