"""The comparison across runs at relative depth (`depth.html`).

Every run of the database on shared axes: the quantitative lens hit rate per layer, the
blocking curves per window, and the ablation flip rates, so that models of different
depths (LLaVA-1.5's 32 layers, a tiny model's 2) can be read against each other.

Relative depth is a hidden-state index divided by L, the model's number of decoder layers:
index 0 is the input embeddings, index l the output of decoder layer l (0-based l - 1), index
L the last layer's output. So a lens run, which stores L + 1 hidden states (layer 0 ..
L), puts layer l at l / L. A blocking window over decoder layers s..e (0-based, inclusive)
acts on the hidden state entering layer s, index s, and is placed at s / L. Ablation flip
rates have no layer: they are a grouped bar chart, one bar per run.

Intervals: lens hit rates and blocking relative accuracy carry 95% percentile bootstrap
intervals over images (db.stats); flip rates 95% Wilson intervals. Runs are toggled by
checkboxes (static/depth.js); every run's marks carry `data-run`.
"""

from __future__ import annotations

from typing import Any

from db import queries, stats
from db.store import ResultsDB
from report import charts, urls
from report.catalogue import RunInfo
from report.pages.ablation import condition_sort_key, setting_sort_key
from report.pages.blocking import window_intervals
from report.pages.lens import differing_settings
from report.site import Site


def relative_depth(index: int, n_decoder_layers: int) -> float:
    """Hidden-state index / number of decoder layers (see the module docstring)."""
    return index / n_decoder_layers


def _labels(records: list[queries.RunRecord]) -> dict[str, str]:
    """A label per run: family, model, experiment and prompt, then whatever else differs."""
    differing = differing_settings(records)
    labels: dict[str, str] = {}
    for record in records:
        config = record.config or {}
        parts = [str(config.get("family") or "family not recorded"), record.model_id, record.experiment]
        prompt = str(config.get("prompt") or "").replace("\n", " ")
        if prompt:
            parts.append("prompt \u201c" + (prompt if len(prompt) <= 40 else prompt[:39] + "\u2026") + "\u201d")
        if "top_k" in differing and record.experiment == "lens":
            parts.append(f"top-{config.get('top_k', '?')}")
        if "dtype" in differing:
            parts.append(str(config.get("dtype")))
        labels[record.run_id] = " \u00b7 ".join(parts)
    seen: dict[str, int] = {}
    for label in labels.values():
        seen[label] = seen.get(label, 0) + 1
    # Two runs alike in all of that (a rerun, another revision): the run id tells them apart.
    return {run_id: label + (f" \u00b7 {run_id}" if seen[label] > 1 else "") for run_id, label in labels.items()}


def _lens_series(quant_runs: list[dict[str, Any]], keys: dict[str, dict[str, Any]], which: str) -> list[dict]:
    series = []
    for q in quant_runs:
        r = q["result"]
        if r.n_layers < 2:  # embeddings alone: no depth axis
            continue
        n_decoder = r.n_layers - 1
        values, lows, highs = getattr(r, which), getattr(r, f"{which}_ci_low"), getattr(r, f"{which}_ci_high")
        key = keys[r.run_id]
        series.append(
            {
                **key,
                "n_note": f"{r.n_images} images, {r.n_positions} object positions",
                "points": [
                    {
                        "depth": relative_depth(layer, n_decoder),
                        "value": values[layer],
                        "low": lows[layer],
                        "high": highs[layer],
                        "n": f"{r.n_images} images, {r.n_positions} positions",
                        "where": f"layer {layer} of {n_decoder}",
                    }
                    for layer in range(r.n_layers)
                ],
            }
        )
    return series


def _blocking_charts(db: ResultsDB, blocking_runs: list[RunInfo], keys: dict[str, dict[str, Any]]) -> list[dict]:
    """One chart per (target, source) pair: relative accuracy of every run at relative depth."""
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in blocking_runs:
        rows = queries.blocking_curves(db, run.run_id, "sliding")
        if not rows:
            continue
        n_decoder = queries.run_layer_count(db, run.run_id) or max(int(r["layer_end"]) for r in rows) + 1
        intervals = window_intervals(queries.blocking_outcomes(db, run.run_id, "sliding"))
        baseline = queries.blocking_curves(db, run.run_id, "baseline")
        n_images = int(baseline[0]["n"]) if baseline else 0
        for target, source in sorted({(r["target"], r["source"]) for r in rows}):
            pair_rows = sorted(
                (r for r in rows if r["target"] == target and r["source"] == source), key=lambda r: r["layer_start"]
            )
            points = []
            for r in pair_rows:
                ci = intervals.get((target, source, r["layer_start"], r["layer_end"]), {})
                points.append(
                    {
                        "depth": relative_depth(int(r["layer_start"]), n_decoder),
                        "value": r["relative_accuracy"],
                        "low": ci.get("relative_accuracy_ci_low"),
                        "high": ci.get("relative_accuracy_ci_high"),
                        "n": f"{r['n']} images",
                        "where": f"layers {r['layer_start']}\u2013{r['layer_end']} of {n_decoder}",
                    }
                )
            by_pair.setdefault((target, source), []).append(
                {**keys[run.run_id], "n_note": f"{n_images} images with a baseline", "points": points}
            )
    return [
        {
            "target": target,
            "source": source,
            "series": series,
            "chart": charts.relative_depth_chart(series, y_label="relative accuracy", reference=1.0),
        }
        for (target, source), series in sorted(by_pair.items())
    ]


def _ablation_charts(db: ResultsDB, ablation_runs: list[RunInfo], keys: dict[str, dict[str, Any]]) -> list[dict]:
    """One grouped bar chart per setting: % flipped per condition, one bar per run."""
    by_setting: dict[str, dict[str, dict[str, Any]]] = {}
    for run in ablation_runs:
        for row in queries.ablation_summary(db, run.run_id):
            if row["condition"] == "none":
                continue
            n, flipped = int(row["n_baseline_correct"]), int(row["n_flipped"])
            low, high = stats.wilson_percent(flipped, n) or (None, None)
            pct = float(row["pct_flipped"])
            values = by_setting.setdefault(row["setting"], {}).setdefault(run.run_id, {})
            values[row["condition"]] = {
                "value": pct,
                "low": low,
                "high": high,
                "n": n,
                "title": (
                    f"{keys[run.run_id]['name']}: {row['setting']} / {row['condition']}: {flipped} of {n} "
                    f"baseline-correct answers flipped ({pct:.1f}%"
                    + (f", 95% Wilson CI {low:.1f}\u2013{high:.1f}%" if low is not None else "")
                    + f", n = {n})"
                ),
            }
    out = []
    for setting in sorted(by_setting, key=setting_sort_key):
        per_run = by_setting[setting]
        groups = sorted({c for values in per_run.values() for c in values}, key=condition_sort_key)
        series = [
            {
                **keys[run.run_id],
                "values": per_run[run.run_id],
                "n_note": ", ".join(
                    sorted({f"n = {v['n']}" for v in per_run[run.run_id].values()}, key=lambda s: int(s[4:]))
                )
                + " baseline-correct images",
            }
            for run in ablation_runs
            if run.run_id in per_run
        ]
        out.append(
            {
                "setting": setting,
                "series": series,
                "chart": charts.grouped_bar_chart(groups, series, y_label="% flipped"),
            }
        )
    return out


def write_depth_page(db: ResultsDB, site: Site, runs: list[RunInfo], quant_runs: list[dict[str, Any]]) -> int:
    """Write depth.html; `quant_runs` are the quantitative page's results (one per lens run
    with annotated object cells). Returns the number of runs on the page."""
    quant_ids = {q["run"].run_id for q in quant_runs}
    blocking_runs = [r for r in runs if r.experiment == "blocking"]
    ablation_runs = [r for r in runs if r.experiment == "ablation"]
    shown = [r for r in runs if r.run_id in quant_ids or r in blocking_runs or r in ablation_runs]
    records = {record.run_id: record for record in queries.runs(db)}
    labels = _labels([records[r.run_id] for r in shown if r.run_id in records])
    keys = {
        run.run_id: {
            "key": f"run-{i}",
            "name": labels.get(run.run_id, run.model_id),
            "color": charts.PALETTE[i % len(charts.PALETTE)],
            "dash": charts.DASHES[i % len(charts.DASHES)],
        }
        for i, run in enumerate(shown)
    }
    lens_charts: list[dict[str, Any]] = []
    for which, title in (("top1", "top-1"), ("topk", "top-k (each run's own k)")):
        series = _lens_series(quant_runs, keys, which)
        if series:
            chart = charts.relative_depth_chart(series, y_label=f"{title} hit rate", percent=True)
            lens_charts.append({"which": which, "title": title, "series": series, "chart": chart})
    blocking_charts = _blocking_charts(db, blocking_runs, keys)
    ablation_charts = _ablation_charts(db, ablation_runs, keys)
    # Only runs that appear in some chart get a checkbox.
    drawn = {
        s["key"] for group in (lens_charts, blocking_charts, ablation_charts) for item in group for s in item["series"]
    }
    run_list = [
        {**keys[run.run_id], "run": run, "n_layers": queries.run_layer_count(db, run.run_id)}
        for run in shown
        if keys[run.run_id]["key"] in drawn
    ]
    site.render(
        "depth.html.j2",
        urls.DEPTH,
        run_list=run_list,
        lens_charts=lens_charts,
        blocking_charts=blocking_charts,
        ablation_charts=ablation_charts,
        bootstrap={"resamples": stats.BOOTSTRAP_RESAMPLES, "seed": stats.BOOTSTRAP_SEED},
        runs_here=[item["run"] for item in run_list],
    )
    return len(run_list)
