"""`llava-interp collect blocking` end to end on the demo images: rows, limit, resume, errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

from collector.cli import cli
from db.store import ResultsDB

# Demo images 1-3 have a single-instance object between 4000 and 12000 px² (image 4's square is larger).
AREA = "4000:12000"


def _args(tiny_checkpoints, demo_images, db, questions, *extra):
    folder, annotations = demo_images
    return [
        "collect",
        "blocking",
        "--model",
        str(tiny_checkpoints["llava-1.5"]),
        "--device",
        "cpu",
        "--images",
        str(folder),
        "--annotations",
        str(annotations),
        "--db",
        str(db),
        "--questions",
        str(questions),
        "--object-area",
        AREA,
        "--window",
        "2",
        "--sources",
        "object_1,image_minus_last_row",
        "--targets",
        "last",
        "--quiet",
        *extra,
    ]


def test_collect_blocking_writes_rows_and_resumes(tmp_path, tiny_checkpoints, demo_images):
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({"1": ["What is the shape?"], "2": ["What shape is it?"], "3": []}))
    db_path = tmp_path / "results.duckdb"
    runner = CliRunner()
    args = _args(tiny_checkpoints, demo_images, db_path, questions, "--no-curate", "--limit", "1", "--batch-size", "7")
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "3 images selected, 1 written (1 kept, 0 skipped)" in result.output

    with ResultsDB(db_path, read_only=True) as db:
        run = db.runs("blocking")[0]
        assert run["status"] == "complete"
        assert run["config"]["questions_file"] == str(questions) and run["config"]["area_range"] == [4000.0, 12000.0]
        rows = db.sql(
            "SELECT source, target, window_kind, preset, layer_start, layer_end, len(source_positions), "
            "target_positions FROM blocking WHERE image_id = 1 ORDER BY window_kind, source, layer_start, layer_end"
        )
        n_positions = db.sql("SELECT n_positions FROM run_images WHERE image_id = 1")[0][0]
        assert rows[0][:3] == ("none", "none", "baseline")
        conditions = rows[1:]
        # 2 sources x 1 target x (6 presets + 4 sliding windows of the 4-layer model)
        assert len(conditions) == 2 * (6 + 4)
        assert {r[7][0] for r in conditions} == {n_positions - 1}
        assert {r[6] for r in conditions if r[0] == "image_minus_last_row"} == {576 - 24}
        assert {(r[4], r[5]) for r in conditions if r[2] == "sliding"} == {(0, 1), (1, 2), (2, 3), (3, 3)}
        assert db.sql("SELECT count(*) FROM positions WHERE image_id = 1")[0][0] == n_positions
        assert db.sql("SELECT count(*) FROM image_views WHERE image_id = 1")[0][0] == 1
        curves = db.sql("SELECT count(*), min(n), max(n) FROM blocking_curves WHERE window_kind <> 'baseline'")[0]
        assert curves == (len(conditions), 1, 1)

    # The same command again: nothing to do, and the summary says the limit's image is already complete
    # (it used to report "0 already complete" when a --limit run resumed).
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "0 written (0 kept, 0 skipped), 1 already complete; 1 kept in total" in result.output

    # Rerun without the limit: image 1 is resumed, not redone; 2 is written, 3 is skipped (no question).
    result = runner.invoke(
        cli, _args(tiny_checkpoints, demo_images, db_path, questions, "--no-curate", "--batch-size", "7")
    )
    assert result.exit_code == 0, result.output
    assert "2 written (1 kept, 1 skipped: 1 empty_question_list), 1 already complete; 2 kept in total" in result.output
    with ResultsDB(db_path, read_only=True) as db:
        assert len(db.runs("blocking")) == 1
        assert db.sql("SELECT image_id, count(*) FROM blocking GROUP BY 1 ORDER BY 1") == [(1, 21), (2, 21)]
        assert db.sql("SELECT image_id, reason FROM skipped") == [(3, "empty_question_list")]


def test_curation_skips_wrong_baselines(tmp_path, tiny_checkpoints, demo_images):
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({"1": ["What is the shape?"]}))
    db_path = tmp_path / "curated.duckdb"
    result = CliRunner().invoke(cli, _args(tiny_checkpoints, demo_images, db_path, questions, "--limit", "1"))
    assert result.exit_code == 0, result.output
    with ResultsDB(db_path, read_only=True) as db:
        # The random model names no shape, so every image stops at its baseline; no kept image
        # means --limit 1 never stops the loop.
        assert db.sql("SELECT image_id, reason FROM skipped ORDER BY 1") == [
            (1, "baseline_incorrect"),
            (2, "no_question"),
            (3, "no_question"),
        ]
        assert db.sql("SELECT count(*), bool_and(window_kind = 'baseline') FROM blocking") == [(1, True)]


def test_bad_input_is_one_line_errors(tmp_path, tiny_checkpoints, demo_images):
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps({"1": ["What?"]}))
    folder, annotations = demo_images
    runner = CliRunner()
    db_path = tmp_path / "r.duckdb"
    cases = {
        "--object-area must be MIN:MAX": _args(
            tiny_checkpoints, demo_images, db_path, questions, "--object-area", "big"
        ),
        "needs 0 <= MIN < MAX": _args(tiny_checkpoints, demo_images, db_path, questions, "--object-area", "9:1"),
        "--sources: unknown object_9": _args(
            tiny_checkpoints, demo_images, db_path, questions, "--sources", "object_9"
        ),
        "questions file not found": _args(tiny_checkpoints, demo_images, db_path, tmp_path / "none.json"),
    }
    bad_questions = tmp_path / "bad.json"
    bad_questions.write_text(json.dumps({"1": "What?"}))
    cases['must be "<image id>"'] = _args(tiny_checkpoints, demo_images, db_path, bad_questions)
    no_annotations = _args(tiny_checkpoints, demo_images, db_path, questions)
    index = no_annotations.index("--annotations")
    del no_annotations[index : index + 2]
    cases["give --annotations with --images"] = no_annotations
    for message, args in cases.items():
        result = runner.invoke(cli, args)
        assert result.exit_code == 1, (message, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1

    result = runner.invoke(cli, ["collect", "blocking", "--help"])
    assert result.exit_code == 0
    for option in (
        "--questions",
        "--max-annotations",
        "--object-area",
        "--no-curate",
        "--window",
        "--attn-implementation",
        "--batch-size",
        "--limit",
        "--quiet",
    ):
        assert option in result.output
