"""The README's demo command, end to end: every experiment, the database and the site."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from collector.cli import cli
from db.stats import wilson_interval
from report.site import DEMO_WARNING, ORGANISM_WARNING


def _run_demo(tmp_path, *extra):
    out = tmp_path / "demo-out"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    assert (out / "site" / "index.html").is_file() and (out / "site" / "quantitative.html").is_file()
    return duckdb.connect(str(out / "results.duckdb"), read_only=True)


def _whiskers(page: Path) -> list[dict[str, str]]:
    """The attributes of every interval whisker drawn on a page."""
    return [
        dict(re.findall(r'([\w-]+)="([^"]*)"', tag)) for tag in re.findall(r"<line class=\"ci[^>]*>", page.read_text())
    ]


def _run_page(site: Path, experiment: str) -> Path:
    [page] = (site / "experiments").glob(f"{experiment}-*.html")
    return page


def test_random_weights_demo_runs_every_experiment(tmp_path):
    with _run_demo(tmp_path, "--random-weights") as db:
        experiments = {row[0] for row in db.sql("SELECT experiment FROM runs WHERE status = 'complete'").fetchall()}
        assert experiments == {"lens", "ablation", "blocking"}
        assert db.sql("SELECT count(*) FROM mean_vectors").fetchall()[0][0] == 1
    site = tmp_path / "demo-out" / "site"
    # Random weights answer nothing right, but the lens hit rates and the class probability
    # under blocking are still drawn with their intervals, here and on the depth page.
    assert _whiskers(site / "quantitative.html") and _whiskers(_run_page(site, "blocking"))
    assert _whiskers(site / "depth.html")
    assert DEMO_WARNING in (site / "index.html").read_text(encoding="utf-8")


@pytest.mark.slow  # trains the organism once (about two CPU-minutes), then it is cached
def test_organism_demo_shows_the_effects(tmp_path):
    """On the organism the demo's numbers mean something: every baseline answer is right, and
    ablating the object's tokens flips far more answers than ablating as many random tokens
    (measured: 83-100% against 0-8%, with the default recipe's seed)."""
    with _run_demo(tmp_path) as db:
        rates = dict(
            ((setting, condition), (n, pct))
            for setting, condition, n, pct in db.sql(
                "SELECT setting, condition, n_baseline_correct, pct_flipped FROM ablation_summary"
            ).fetchall()
        )
        baseline_correct = db.sql(
            "SELECT setting, avg(correct::INT) FROM ablations WHERE condition = 'none' GROUP BY 1"
        ).fetchall()
        flips = {
            (setting, condition): (int(n), int(flipped))
            for setting, condition, n, flipped in db.sql(
                "SELECT a.setting, a.condition, count(*), count(*) FILTER (WHERE NOT a.correct) FROM ablations a "
                "JOIN ablations b ON b.image_id = a.image_id AND b.setting = a.setting AND b.condition = 'none' "
                "AND b.correct AND b.run_id = a.run_id WHERE a.condition <> 'none' GROUP BY 1, 2"
            ).fetchall()
        }
    assert all(share >= 0.9 for _, share in baseline_correct), baseline_correct
    for setting in ("generative", "polling", "vqa"):
        n, object_rate = rates[(setting, "object_1")]
        _, random_rate = rates[(setting, "random_5")]
        assert n >= 10 and object_rate >= 60 and random_rate <= 20, (setting, rates)
    # The pages show each effect with its interval: one Wilson whisker per bar, equal to
    # the interval of the raw counts, and the object's interval clear of the random one's.
    site = tmp_path / "demo-out" / "site"
    ablation_whiskers = _whiskers(_run_page(site, "ablation"))
    assert len(ablation_whiskers) == len(flips)
    drawn = sorted((float(w["data-low"]), float(w["data-high"]), int(w["data-n"])) for w in ablation_whiskers)
    expected = sorted((100 * lo, 100 * hi, n) for n, k in flips.values() for lo, hi in [wilson_interval(k, n)])
    assert drawn == [(pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9), n) for lo, hi, n in expected]
    for setting in ("generative", "polling", "vqa"):
        object_low, _ = wilson_interval(flips[(setting, "object_1")][1], flips[(setting, "object_1")][0])
        _, random_high = wilson_interval(flips[(setting, "random_5")][1], flips[(setting, "random_5")][0])
        assert object_low > random_high, setting
    for page in (site / "quantitative.html", _run_page(site, "blocking"), site / "depth.html"):
        assert _whiskers(page), page
    # The organism's banner says what its results are (synthetic scenes), not "random weights".
    index = (site / "index.html").read_text(encoding="utf-8")
    assert ORGANISM_WARNING in index and DEMO_WARNING not in index
