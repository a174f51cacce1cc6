"""The README's demo command, end to end: every experiment, the database and the site."""

from __future__ import annotations

import duckdb
import pytest
from click.testing import CliRunner

from collector.cli import cli


def _run_demo(tmp_path, *extra):
    out = tmp_path / "demo-out"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    assert (out / "site" / "index.html").is_file() and (out / "site" / "quantitative.html").is_file()
    return duckdb.connect(str(out / "results.duckdb"), read_only=True)


def test_random_weights_demo_runs_every_experiment(tmp_path):
    with _run_demo(tmp_path, "--random-weights") as db:
        experiments = {row[0] for row in db.sql("SELECT experiment FROM runs WHERE status = 'complete'").fetchall()}
        assert experiments == {"lens", "ablation", "blocking"}
        assert db.sql("SELECT count(*) FROM mean_vectors").fetchall()[0][0] == 1


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
    assert all(share >= 0.9 for _, share in baseline_correct), baseline_correct
    for setting in ("generative", "polling", "vqa"):
        n, object_rate = rates[(setting, "object_1")]
        _, random_rate = rates[(setting, "random_5")]
        assert n >= 10 and object_rate >= 60 and random_rate <= 20, (setting, rates)
