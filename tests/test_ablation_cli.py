"""`collect ablation` and `collect mean-vector` through the CLI: rows, resume, one-line errors."""

from __future__ import annotations

import re

import torch
from click.testing import CliRunner

from collector.cli import cli
from db.store import ResultsDB
from tests.conftest import SHARED_DATA, require_shared


def _one_line_error(result, pattern):
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), result.output


def _args(tiny_checkpoints, demo_images, db, *extra):
    image_dir, annotation_file = demo_images
    return [
        "collect",
        "ablation",
        "--model",
        str(tiny_checkpoints["llava-1.5"]),
        "--images",
        str(image_dir),
        "--annotations",
        str(annotation_file),
        "--db",
        str(db),
        "--no-curate",
        "--object-area",
        "4000:12000",
        "--k",
        "5,20",
        "--ig-steps",
        "2",
        "--max-new-tokens",
        "3",
        "--settings",
        "polling",
        "--quiet",
        *extra,
    ]


def test_collect_ablation_writes_rows_and_resumes(tmp_path, tiny_checkpoints, demo_images):
    db_path = tmp_path / "r.duckdb"
    runner = CliRunner()
    first = runner.invoke(cli, _args(tiny_checkpoints, demo_images, db_path, "--limit", "1"))
    assert first.exit_code == 0, first.output
    assert "3 images selected, 1 written (1 kept, 0 skipped), 0 already complete" in first.output
    second = runner.invoke(cli, _args(tiny_checkpoints, demo_images, db_path, "--limit", "2"))
    assert second.exit_code == 0, second.output
    assert "1 written (1 kept, 0 skipped), 1 already complete; 2 kept in total" in second.output
    with ResultsDB(db_path, read_only=True) as db:
        [run] = db.runs("ablation")
        assert run["config"]["k"] == [5, 20] and run["config"]["curate"] is False
        rows = db.sql("SELECT image_id, count(*), count(DISTINCT condition) FROM ablations GROUP BY 1 ORDER BY 1")
        assert rows == [
            (1, 10, 10),
            (2, 10, 10),
        ]  # none, object_0..2, register, random_5/20, gradient_5/20, image_noise
        assert db.sql("SELECT count(*) FROM run_images WHERE run_id = ?", [run["run_id"]])[0][0] == 2


def test_bad_ablation_input_is_one_line(tmp_path, tiny_checkpoints, demo_images):
    runner = CliRunner()
    db_path = tmp_path / "r.duckdb"
    _one_line_error(
        runner.invoke(cli, _args(tiny_checkpoints, demo_images, db_path, "--settings", "vqa")), "needs --questions"
    )
    _one_line_error(
        runner.invoke(cli, _args(tiny_checkpoints, demo_images, db_path, "--object-area", "big")), "MIN:MAX"
    )
    _one_line_error(
        runner.invoke(cli, _args(tiny_checkpoints, demo_images, db_path, "--object-area", "9:1")), "MIN < MAX"
    )
    _one_line_error(runner.invoke(cli, _args(tiny_checkpoints, demo_images, db_path, "--k", "5,x")), "--k")
    torch.save(torch.zeros(4096), tmp_path / "big.pt")
    _one_line_error(
        runner.invoke(cli, _args(tiny_checkpoints, demo_images, db_path, "--replacement", str(tmp_path / "big.pt"))),
        "size 4096 but the model's hidden size is 64",
    )
    image_dir, _ = demo_images
    no_annotations = [
        "collect",
        "ablation",
        "--model",
        str(tiny_checkpoints["llava-1.5"]),
        "--images",
        str(image_dir),
        "--db",
        str(db_path),
    ]
    _one_line_error(runner.invoke(cli, no_annotations), "needs COCO annotations")


def test_seed_vector_is_refused_for_a_tiny_model(tmp_path, tiny_checkpoints, demo_images):
    seed = require_shared(SHARED_DATA / "seed_reference" / "val_acts_full_precision_phi_mean_vector.pt")
    result = CliRunner().invoke(
        cli, _args(tiny_checkpoints, demo_images, tmp_path / "r.duckdb", "--replacement", str(seed))
    )
    _one_line_error(result, "size 3072")


def test_mean_vector_command(tmp_path, tiny_checkpoints, demo_images):
    image_dir, annotation_file = demo_images
    out = tmp_path / "mean.pt"
    db_path = tmp_path / "r.duckdb"
    result = CliRunner().invoke(
        cli,
        [
            "collect",
            "mean-vector",
            "--model",
            str(tiny_checkpoints["llava-1.5"]),
            "--images",
            str(image_dir),
            "--limit",
            "2",
            "--out",
            str(out),
            "--db",
            str(db_path),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1152 image tokens over 2 images" in result.output
    vector = torch.load(out, weights_only=True)
    assert vector.shape == (64,) and vector.dtype == torch.float32
    vector_id = re.search(r"db:(\S+)\)", result.output).group(1)
    with ResultsDB(db_path, read_only=True) as db:
        [(n_images, n_tokens, stored)] = db.sql(
            "SELECT n_images, n_tokens, vector FROM mean_vectors WHERE vector_id = ?", [vector_id]
        )
    assert (n_images, n_tokens) == (2, 1152) and torch.equal(torch.tensor(stored, dtype=torch.float32), vector)
    # usable as --replacement db:<id>
    run = CliRunner().invoke(
        cli, _args(tiny_checkpoints, demo_images, db_path, "--limit", "1", "--replacement", f"db:{vector_id}")
    )
    assert run.exit_code == 0, run.output
    with ResultsDB(db_path, read_only=True) as db:
        assert db.runs("ablation")[0]["config"]["replacement"] == f"db:{vector_id}"
