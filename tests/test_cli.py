"""The command line: documented options, clean one-line errors, a real collect run."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from collector.cli import cli
from db.store import ResultsDB


def _all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        path = prefix + (name,)
        yield path, command
        if isinstance(command, click.Group):
            yield from _all_commands(command, path)


@pytest.mark.parametrize("path", [p for p, _ in _all_commands(cli)], ids=lambda p: " ".join(p))
def test_every_command_documents_every_option(path):
    command = dict(_all_commands(cli))[path]
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert (command.help or "").split()[0] in result.output
    for parameter in command.params:
        if isinstance(parameter, click.Option):
            assert parameter.help, f"{' '.join(path)} {parameter.opts[0]} has no help"
            assert parameter.opts[0] in result.output


def _run(args):
    result = CliRunner().invoke(cli, args)
    return result


def _assert_one_line_error(result, pattern):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) >= 1 and "Traceback" not in result.output
    error_lines = [line for line in lines if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    assert re.search(pattern, error_lines[0]), error_lines[0]


def test_missing_image_folder(tmp_path, tiny_checkpoints):
    result = _run(
        [
            "collect",
            "lens",
            "--model",
            str(tiny_checkpoints["llava-1.5"]),
            "--images",
            str(tmp_path / "nope"),
            "--db",
            str(tmp_path / "r.duckdb"),
        ]
    )
    _assert_one_line_error(result, "image folder not found")


def test_unreadable_image(tmp_path, tiny_checkpoints):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    # --strict: the fail-fast behaviour (without it the file is recorded in `skipped`).
    result = _run(
        [
            "collect",
            "lens",
            "--model",
            str(tiny_checkpoints["llava-1.5"]),
            "--strict",
            "--images",
            str(folder),
            "--db",
            str(tmp_path / "r.duckdb"),
        ]
    )
    _assert_one_line_error(result, "cannot read image .*broken.jpg")


def test_unknown_model(tmp_path, demo_images):
    image_dir, _ = demo_images
    result = _run(
        [
            "collect",
            "lens",
            "--model",
            str(tmp_path / "no-such-model"),
            "--images",
            str(image_dir),
            "--db",
            str(tmp_path / "r.duckdb"),
        ]
    )
    _assert_one_line_error(result, "cannot load model")


def test_conflicting_inputs(tmp_path, demo_images, tiny_checkpoints):
    image_dir, _ = demo_images
    result = _run(
        [
            "collect",
            "lens",
            "--model",
            str(tiny_checkpoints["llava-1.5"]),
            "--images",
            str(image_dir),
            "--coco-root",
            str(tmp_path),
            "--split",
            "val2017",
            "--db",
            str(tmp_path / "r.duckdb"),
        ]
    )
    _assert_one_line_error(result, "exactly one input")


def test_bad_database_file_is_not_overwritten(tmp_path, demo_images, tiny_checkpoints):
    image_dir, _ = demo_images
    notes = tmp_path / "notes.duckdb"
    notes.write_text("my precious notes")
    result = _run(
        [
            "collect",
            "lens",
            "--model",
            str(tiny_checkpoints["llava-1.5"]),
            "--images",
            str(image_dir),
            "--db",
            str(notes),
        ]
    )
    _assert_one_line_error(result, "cannot open database")
    assert notes.read_text() == "my precious notes"


def test_collect_lens_from_coco_layout(tmp_path, tiny_checkpoints, demo_images):
    """--coco-root R --split S reads R/S/<file> and R/annotations/instances_S.json."""
    import shutil

    image_dir, annotation_file = demo_images
    root = tmp_path / "coco"
    shutil.copytree(image_dir, root / "val2017")
    (root / "annotations").mkdir()
    shutil.copy(annotation_file, root / "annotations" / "instances_val2017.json")
    db_path = tmp_path / "r.duckdb"
    args = [
        "collect",
        "lens",
        "--model",
        str(tiny_checkpoints["llava-phi"]),
        "--coco-root",
        str(root),
        "--split",
        "val2017",
        "--db",
        str(db_path),
        "--limit",
        "2",
        "--top-k",
        "2",
        "--quiet",
    ]
    result = _run(args)
    assert result.exit_code == 0, result.output
    assert "2 images selected, 2 written (2 kept, 0 skipped), 0 already complete" in result.output
    with ResultsDB(db_path, read_only=True) as db:
        assert db.sql("SELECT image_id, source FROM images ORDER BY 1") == [(1, "coco:val2017"), (2, "coco:val2017")]
        run = db.runs()[0]
        assert run["config"]["prompt_template"].startswith("<|user|>")
        assert run["config"]["demo"] is True and run["config"]["split"] == "val2017"
        assert db.sql("SELECT DISTINCT rank FROM logit_lens ORDER BY 1") == [(1,), (2,)]
        assert db.sql("SELECT count(*) FROM annotations")[0][0] == 3
    again = _run(args)
    assert again.exit_code == 0 and "0 written (0 kept, 0 skipped), 2 already complete" in again.output


def test_pipeline_options_on_every_collect_command(tmp_path, tiny_checkpoints, demo_images):
    """collect lens --batch-size N --loader-workers W writes what the defaults write, and
    records both; ablation and blocking take --loader-workers (their --batch-size batches
    conditions of one image, documented in --help)."""
    image_dir, annotation_file = demo_images
    common = [
        "collect",
        "lens",
        "--model",
        str(tiny_checkpoints["llava-1.5"]),
        "--images",
        str(image_dir),
        "--limit",
        "3",
        "--top-k",
        "2",
        "--quiet",
    ]
    plain, batched = tmp_path / "plain.duckdb", tmp_path / "batched.duckdb"
    assert _run([*common, "--db", str(plain)]).exit_code == 0
    result = _run([*common, "--db", str(batched), "--batch-size", "3", "--loader-workers", "0"])
    assert result.exit_code == 0, result.output
    with ResultsDB(plain, read_only=True) as a, ResultsDB(batched, read_only=True) as b:
        assert b.runs()[0]["config"]["batch_size"] == 3 and b.runs()[0]["config"]["loader_workers"] == 0
        query = "SELECT image_id, layer, position, rank, token_id FROM logit_lens ORDER BY ALL"
        assert a.sql(query) == b.sql(query)
    for command in ("lens", "ablation", "blocking"):
        help_text = " ".join(_run(["collect", command, "--help"]).output.split())
        assert "--loader-workers" in help_text
        assert ("Images per forward" in help_text) == (command == "lens")
        if command != "lens":
            assert "Images are processed one at a time" in help_text
    _assert_one_line_error(_run([*common, "--db", str(plain), "--batch-size", "0"]), "--batch-size")
