"""Bad inputs through the real command line: each ends in one `Error:` line (exit 1) or is
recorded and the run goes on; the database afterwards says what happened."""

from __future__ import annotations

import io
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from collector.cli import cli
from db.store import ResultsDB
from tests.conftest import COCO_SAMPLE, require_shared


def _run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _assert_one_line_error(result, pattern, exit_code=1):
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    assert not [line for line in lines if line.startswith("Usage:") or line.startswith("Try ")], result.output
    assert re.search(pattern, error_lines[0]), error_lines[0]


def _real_image() -> Image.Image:
    with Image.open(require_shared(COCO_SAMPLE / "images" / "000000039769.png")) as image:
        return image.convert("RGB")


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height (one gray channel) and whose pixel data is a
    few bytes: enough for the size check, which must come before any decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture
def lens_args(tiny_checkpoints):
    def args(folder: Path, db: Path, *more):
        return [
            "collect",
            "lens",
            "--model",
            tiny_checkpoints["llava-1.5"],
            "--images",
            folder,
            "--db",
            db,
            "--top-k",
            "2",
            "--quiet",
            *more,
        ]

    return args


def _folder_with_bad_files(tmp_path: Path, demo_images) -> Path:
    image_dir, _ = demo_images
    folder = tmp_path / "imgs"
    shutil.copytree(image_dir, folder)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_bytes(b"these are my notes, not a picture")
    whole = _jpeg_bytes(_real_image())
    # A numeric stem is the image id (a fixed file keeps it; other names are content hashes).
    (folder / "000000039769.jpg").write_bytes(whole[: len(whole) // 2])
    return folder


def _skipped(db_path: Path) -> dict[str, tuple[str, str]]:
    with ResultsDB(db_path, read_only=True) as db:
        rows = db.sql("SELECT i.file_name, s.reason, s.detail FROM skipped s JOIN images i USING (image_id) ORDER BY 1")
    return {name: (reason, detail) for name, reason, detail in rows}


def test_bad_image_files_are_skipped_and_the_run_goes_on(tmp_path, demo_images, lens_args):
    folder = _folder_with_bad_files(tmp_path, demo_images)
    n_good = len(list(demo_images[0].iterdir()))
    db_path = tmp_path / "r.duckdb"

    result = _run(lens_args(folder, db_path))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "Error" not in result.output
    assert (
        f"{n_good + 3} images selected, {n_good + 3} written ({n_good} kept, 3 skipped: "
        "1 truncated, 2 unreadable), 0 already complete"
    ) in result.output
    sql = re.search(r"list the skipped images: (SELECT .*)$", result.output, re.M)
    assert sql, result.output
    skipped = _skipped(db_path)
    assert {name: reason for name, (reason, _) in skipped.items()} == {
        "empty.jpg": "unreadable",
        "notes.png": "unreadable",
        "000000039769.jpg": "truncated",
    }
    assert "empty file" in skipped["empty.jpg"][1]
    with ResultsDB(db_path, read_only=True) as db:
        assert len(db.sql(sql.group(1))) == 3  # the printed SQL lists them
        assert db.runs()[0]["status"] == "complete"
        assert db.sql("SELECT count(DISTINCT image_id) FROM logit_lens")[0][0] == n_good

    # A rerun passes over the skipped images (it does not stop at them, nor retry them).
    again = _run(lens_args(folder, db_path))
    assert again.exit_code == 0, again.output
    assert f"0 written (0 kept, 0 skipped), {n_good + 3} already complete" in again.output

    # Fixed file + --retry-skipped: processed again; the others stay skipped.
    (folder / "000000039769.jpg").write_bytes(_jpeg_bytes(_real_image()))
    retry = _run(lens_args(folder, db_path, "--retry-skipped"))
    assert retry.exit_code == 0, retry.output
    assert "3 written (1 kept, 2 skipped: 2 unreadable)" in retry.output, retry.output
    assert set(_skipped(db_path)) == {"empty.jpg", "notes.png"}
    with ResultsDB(db_path, read_only=True) as db:
        assert db.sql("SELECT width, height FROM images WHERE image_id = 39769") == [(640, 480)]
        assert db.sql("SELECT count(DISTINCT image_id) FROM logit_lens")[0][0] == n_good + 1


def test_strict_stops_at_the_first_bad_file_before_the_model_loads(tmp_path, demo_images, lens_args):
    folder = _folder_with_bad_files(tmp_path, demo_images)
    db_path = tmp_path / "r.duckdb"
    result = _run(lens_args(folder, db_path, "--strict"))
    _assert_one_line_error(result, r"cannot read image .*empty\.jpg: empty file .*--strict")
    assert not db_path.exists()  # refused while listing: nothing written


def test_strict_stops_at_a_truncated_file_during_the_run(tmp_path, demo_images, lens_args):
    image_dir, _ = demo_images
    folder = tmp_path / "imgs"
    shutil.copytree(image_dir, folder)
    whole = _jpeg_bytes(_real_image())
    (folder / "zz_truncated.jpg").write_bytes(whole[: len(whole) // 2])  # its header is fine
    db_path = tmp_path / "r.duckdb"
    result = _run(lens_args(folder, db_path, "--strict"))
    _assert_one_line_error(result, r"cannot read image .*zz_truncated\.jpg: .*truncated.*--strict")
    with ResultsDB(db_path, read_only=True) as db:
        assert db.runs()[0]["status"] == "failed"
        assert db.sql("SELECT count(*) FROM skipped")[0][0] == 0
        # the images before it are kept
        assert db.sql("SELECT count(*) FROM run_images")[0][0] == len(list(image_dir.iterdir()))


@pytest.mark.parametrize("side", [10_000, 14_000])
def test_huge_image_is_skipped_as_too_large_without_pil_warning(tmp_path, demo_images, lens_args, side):
    image_dir, _ = demo_images
    folder = tmp_path / "imgs"
    shutil.copytree(image_dir, folder)
    _png_header_only(folder / "huge.png", side, side)
    db_path = tmp_path / "r.duckdb"
    result = _run(lens_args(folder, db_path))
    assert result.exit_code == 0, result.output
    assert "DecompressionBomb" not in result.output and "Traceback" not in result.output
    assert "1 skipped: 1 too_large" in result.output
    reason, detail = _skipped(db_path)["huge.png"]
    assert reason == "too_large"
    assert f"{side}x{side}" in detail and "89,478,485" in detail and "--max-image-pixels" in detail


def test_max_image_pixels_sets_the_limit(tmp_path, demo_images, lens_args):
    image_dir, _ = demo_images
    sizes = {p.name: Image.open(p).size for p in image_dir.iterdir()}
    smallest = min(w * h for w, h in sizes.values())
    db_path = tmp_path / "r.duckdb"
    low = _run(lens_args(image_dir, db_path, "--max-image-pixels", smallest - 1))
    assert low.exit_code == 0, low.output
    assert f"{len(sizes)} skipped: {len(sizes)} too_large" in low.output
    raised = _run(lens_args(image_dir, db_path, "--max-image-pixels", 10**9, "--retry-skipped"))
    assert raised.exit_code == 0, raised.output
    assert f"({len(sizes)} kept, 0 skipped)" in raised.output
    assert _skipped(db_path) == {}


def test_exif_orientation_is_applied_like_transformers(tmp_path, lens_args):
    """A real photo stored sideways with EXIF orientation 6 gives exactly what the upright
    photo gives: the model's view, the stored size, the lens results."""
    from transformers.image_utils import load_image

    from collector.images import folder_images

    upright = _real_image()
    # Orientation 6: "rotate 90° clockwise to display"; stored as the upright image turned back.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "upright").mkdir()
    (tmp_path / "rotated").mkdir()
    upright.save(tmp_path / "upright" / "000000039769.png")
    stored.save(tmp_path / "rotated" / "000000039769.png", exif=exif.tobytes())
    assert Image.open(tmp_path / "rotated" / "000000039769.png").size == (480, 640)

    record = folder_images(tmp_path / "rotated")[0]
    assert (record.width, record.height) == (640, 480)
    loaded = record.load()
    assert loaded.tobytes() == upright.tobytes()
    assert loaded.tobytes() == load_image(str(tmp_path / "rotated" / "000000039769.png")).tobytes()

    results = {}
    for name in ("upright", "rotated"):
        db_path = tmp_path / f"{name}.duckdb"
        result = _run(lens_args(tmp_path / name, db_path))
        assert result.exit_code == 0, result.output
        with ResultsDB(db_path, read_only=True) as db:
            results[name] = (
                db.sql("SELECT width, height FROM images"),
                db.sql("SELECT png, view_width, view_height, scale_x, scale_y, offset_x, offset_y FROM image_views"),
                db.sql("SELECT layer, position, rank, token_id FROM logit_lens ORDER BY 1, 2, 3"),
            )
    assert results["rotated"] == results["upright"]
    assert results["rotated"][0] == [(640, 480)]


# -- models ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_without_final_norm(tmp_path_factory):
    """The tiny LLaVA-1.5 with its final norm removed from the weights file."""
    from safetensors.torch import load_file, save_file

    from collector.tiny import build_tiny_llava

    folder = build_tiny_llava(tmp_path_factory.mktemp("no_norm") / "model", "llava-1.5", seed=1)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    (norm,) = [key for key in state if key.endswith("model.norm.weight") and "layers" not in key]
    del state[norm]
    save_file(state, str(weights), metadata={"format": "pt"})
    return folder


def test_checkpoint_missing_weights_is_refused(tmp_path, demo_images, checkpoint_without_final_norm):
    image_dir, _ = demo_images
    db_path = tmp_path / "r.duckdb"
    args = [
        "collect",
        "lens",
        "--model",
        checkpoint_without_final_norm,
        "--images",
        image_dir,
        "--db",
        db_path,
        "--quiet",
        "--top-k",
        "2",
    ]
    result = _run(args)
    _assert_one_line_error(
        result,
        r"weights do not match the model \(1 missing: model\.language_model\.norm\.weight\)"
        r".*--allow-incomplete-weights",
    )
    assert "MISSING" not in result.output  # transformers' own table is not printed
    if db_path.exists():
        with ResultsDB(db_path, read_only=True) as db:
            assert db.runs() == []


def test_checkpoint_missing_weights_allowed_is_recorded_and_shown(tmp_path, demo_images, checkpoint_without_final_norm):
    image_dir, _ = demo_images
    db_path = tmp_path / "r.duckdb"
    result = _run(
        [
            "collect",
            "lens",
            "--model",
            checkpoint_without_final_norm,
            "--images",
            image_dir,
            "--db",
            db_path,
            "--quiet",
            "--top-k",
            "2",
            "--limit",
            "1",
            "--allow-incomplete-weights",
        ]
    )
    assert result.exit_code == 0, result.output
    with ResultsDB(db_path, read_only=True) as db:
        (run,) = db.runs()
    assert run["config"]["weights_incomplete"] == {"missing": ["model.language_model.norm.weight"]}
    site = tmp_path / "site"
    built = _run(["report", "build", "--db", db_path, "--out", site, "--no-downloads"])
    assert built.exit_code == 0, built.output
    pages = [p for p in site.rglob("*.html") if "Run" in p.read_text() and run["run_id"] in p.read_text()]
    assert pages
    for page in pages:
        assert "incomplete checkpoint weights" in page.read_text(), page
    lens_pages = list((site / "lens").rglob("*.html"))
    assert lens_pages and all("1 missing (model.language_model.norm.weight)" in p.read_text() for p in lens_pages)


# -- checked before the weights are read ------------------------------------------------


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--prompt", "x <image>"], r"--prompt must not contain the image placeholder '<image>'"),
        (
            ["--prompt-template", "USER: {question} ASSISTANT:"],
            r"--prompt-template must contain the image placeholder '<image>' exactly once \(found 0\)",
        ),
        (["--prompt-template", "USER: <image><image> {question} ASSISTANT:"], r"exactly once \(found 2\)"),
        (["--top-k", "100000"], None),
    ],
)
def test_prompt_and_top_k_are_checked_before_loading(tmp_path, demo_images, tiny_checkpoints, extra, pattern):
    image_dir, _ = demo_images
    db_path = tmp_path / "r.duckdb"
    result = _run(
        [
            "collect",
            "lens",
            "--model",
            tiny_checkpoints["llava-1.5"],
            "--images",
            image_dir,
            "--db",
            db_path,
            "--quiet",
            *extra,
        ]
    )
    if pattern is None:  # --top-k has a range of its own (1..100): click's message, same form
        pattern = r"--top-k"
    _assert_one_line_error(result, pattern)
    assert "Loading weights" not in result.output
    assert not db_path.exists()


def test_top_k_larger_than_the_vocabulary(tiny_checkpoints):
    from collector.errors import UserError
    from collector.loading import check_before_load

    with pytest.raises(UserError, match=r"--top-k 99999 is larger than the model's vocabulary \(\d+ tokens\)"):
        check_before_load(str(tiny_checkpoints["llava-1.5"]), top_k=99999)


def test_replacement_of_the_wrong_size_is_refused_before_loading(tmp_path, demo_images, tiny_checkpoints):
    import torch

    image_dir, annotation_file = demo_images
    vector = tmp_path / "v.pt"
    torch.save(torch.zeros(7), vector)
    db_path = tmp_path / "r.duckdb"
    result = _run(
        [
            "collect",
            "ablation",
            "--model",
            tiny_checkpoints["llava-1.5"],
            "--images",
            image_dir,
            "--annotations",
            annotation_file,
            "--db",
            db_path,
            "--replacement",
            vector,
            "--quiet",
        ]
    )
    _assert_one_line_error(result, r"replacement vector .*v\.pt has size 7 but the model's hidden size is \d+")
    assert "Loading weights" not in result.output


def test_pickled_replacement_never_suggests_weights_only_false(tmp_path, demo_images, tiny_checkpoints):
    import torch

    image_dir, annotation_file = demo_images
    vector = tmp_path / "v.pt"
    torch.save({"vector": torch.zeros(8), "made": __import__("datetime").datetime(2024, 1, 1)}, vector)
    result = _run(
        [
            "collect",
            "ablation",
            "--model",
            tiny_checkpoints["llava-1.5"],
            "--images",
            image_dir,
            "--annotations",
            annotation_file,
            "--db",
            tmp_path / "r.duckdb",
            "--replacement",
            vector,
            "--quiet",
        ]
    )
    _assert_one_line_error(result, r"cannot load replacement vector .*v\.pt: it holds Python objects")
    assert "weights_only" not in result.output


def test_malformed_annotations_are_refused_while_listing(tmp_path, demo_images, tiny_checkpoints):
    import json

    image_dir, annotation_file = demo_images
    data = json.loads(annotation_file.read_text())
    del data["annotations"][1]["bbox"]
    bad = tmp_path / "ann.json"
    bad.write_text(json.dumps(data))
    db_path = tmp_path / "r.duckdb"
    result = _run(
        [
            "collect",
            "lens",
            "--model",
            tiny_checkpoints["llava-1.5"],
            "--images",
            image_dir,
            "--annotations",
            bad,
            "--db",
            db_path,
            "--quiet",
        ]
    )
    _assert_one_line_error(result, r"ann\.json: annotations\[1\] lacks or has a wrong type for bbox")
    assert not db_path.exists()


# -- every mistake looks the same ------------------------------------------------------


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["collect", "lens", "--top-k", "0"], r"Invalid value for '--top-k': 0 is not in the range"),
        (["collect", "lens", "--limit", "0"], r"Invalid value for '--limit': 0 is not in the range"),
        (["collect", "lens", "--no-such-option"], r"No such option '--no-such-option'"),
        (["collect", "nonsense"], r"No such command 'nonsense'"),
        (["report", "build", "--db", "x.duckdb", "--out", "FILE"], r"Invalid value for '--out'.* is a file"),
    ],
)
def test_usage_mistakes_are_one_error_line_exit_1(tmp_path, args, pattern):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    result = _run([str(a_file) if arg == "FILE" else arg for arg in args])
    _assert_one_line_error(result, pattern)


def test_help_still_works():
    result = _run(["collect", "lens", "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output and "--retry-skipped" in result.output


# -- databases ---------------------------------------------------------------------------


@pytest.mark.parametrize("table", ["runs", "my_notes"])
def test_a_foreign_duckdb_file_is_refused_untouched(tmp_path, demo_images, tiny_checkpoints, table):
    import duckdb

    image_dir, _ = demo_images
    db_path = tmp_path / "theirs.duckdb"
    with duckdb.connect(str(db_path)) as con:
        con.execute(f"CREATE TABLE {table} (x INTEGER)")
        con.execute(f"INSERT INTO {table} VALUES (42)")
    for args in (
        [
            "collect",
            "lens",
            "--model",
            tiny_checkpoints["llava-1.5"],
            "--images",
            image_dir,
            "--db",
            db_path,
            "--quiet",
        ],
        ["report", "build", "--db", db_path, "--out", tmp_path / "site"],
    ):
        result = _run(args)
        _assert_one_line_error(result, r"theirs\.duckdb is not a llava-interp results database")
        assert "Loading weights" not in result.output
    with duckdb.connect(str(db_path), read_only=True) as con:
        assert con.execute("SELECT table_name FROM information_schema.tables").fetchall() == [(table,)]
        assert con.execute(f"SELECT x FROM {table}").fetchall() == [(42,)]


def test_collect_and_report_agree_on_a_dropped_migrations_table(tmp_path, demo_images, tiny_checkpoints):
    image_dir, _ = demo_images
    db_path = tmp_path / "r.duckdb"
    lens = [
        "collect",
        "lens",
        "--model",
        tiny_checkpoints["llava-1.5"],
        "--images",
        image_dir,
        "--db",
        db_path,
        "--quiet",
        "--limit",
        "1",
        "--top-k",
        "2",
    ]
    assert _run(lens).exit_code == 0
    with ResultsDB(db_path) as db:
        db.sql("DROP TABLE schema_migrations")
    for args in (lens, ["report", "build", "--db", db_path, "--out", tmp_path / "site"]):
        _assert_one_line_error(_run(args), r"is not a llava-interp results database")


def test_serve_never_follows_a_symlink_out_of_the_site(tmp_path):
    """`report serve` answers only files inside the site folder, links resolved: a symlink
    in the site to a file elsewhere on the machine is a 404, one to a file inside is served."""
    import urllib.error
    import urllib.request

    from report.serve import serving

    site, outside = tmp_path / "site", tmp_path / "secret.txt"
    site.mkdir()
    outside.write_text("not for the web")
    (site / "page.html").write_text("<p>hi</p>")
    (site / "leak.txt").symlink_to(outside)
    (site / "alias.html").symlink_to(site / "page.html")
    (site / "outdir").symlink_to(tmp_path)
    with serving(site) as base:
        assert urllib.request.urlopen(base + "page.html").read() == b"<p>hi</p>"
        assert urllib.request.urlopen(base + "alias.html").read() == b"<p>hi</p>"
        for name in ("leak.txt", "outdir/secret.txt", "outdir/"):
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(base + name)
            assert error.value.code == 404
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(urllib.request.Request(base + name, headers={"Range": "bytes=0-3"}))
            assert error.value.code == 404


def test_a_failed_model_load_leaves_no_database_behind(tmp_path, demo_images):
    """The database file is opened before the model loads (a locked file fails fast), but a
    file created for a run that never wrote anything is removed again; an existing one stays."""
    image_folder, _ = demo_images
    db_path = tmp_path / "new.duckdb"
    missing_model = tmp_path / "no-such-model"
    result = CliRunner().invoke(
        cli,
        [
            "collect",
            "lens",
            "--model",
            str(missing_model),
            "--images",
            str(image_folder),
            "--db",
            str(db_path),
            "--quiet",
        ],
    )
    assert result.exit_code == 1 and result.output.startswith("Error:"), result.output
    assert not db_path.exists() and not db_path.with_name("new.duckdb.wal").exists()
    kept = tmp_path / "kept.duckdb"
    ResultsDB(kept).close()
    before = kept.read_bytes()
    result = CliRunner().invoke(
        cli,
        ["collect", "lens", "--model", str(missing_model), "--images", str(image_folder), "--db", str(kept), "--quiet"],
    )
    assert result.exit_code == 1 and kept.read_bytes() == before


def test_disk_full_is_one_line_and_keeps_finished_images(tmp_path, demo_images, lens_args, monkeypatch):
    """A full disk (here: the second image's commit fails with ENOSPC, as DuckDB reports it)
    gives one line naming the database; the first image stays written and a rerun resumes."""
    import errno

    image_dir, _ = demo_images
    db_path = tmp_path / "r.duckdb"
    real_write = ResultsDB.write_image_results
    calls = []

    def write_until_full(self, run_id, image_id, tables):
        calls.append(image_id)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(db_path) + ".wal")
        return real_write(self, run_id, image_id, tables)

    monkeypatch.setattr(ResultsDB, "write_image_results", write_until_full)
    result = CliRunner().invoke(cli, lens_args(image_dir, db_path))
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: disk full while writing") and str(db_path) in lines[-1], result.output
    assert "Traceback" not in result.output
    with ResultsDB(db_path, read_only=True) as db:
        assert db.sql("SELECT count(*) FROM run_images")[0][0] == 1
    monkeypatch.setattr(ResultsDB, "write_image_results", real_write)
    result = CliRunner().invoke(cli, lens_args(image_dir, db_path))
    assert result.exit_code == 0, result.output
    with ResultsDB(db_path, read_only=True) as db:
        assert db.sql("SELECT count(*) FROM run_images")[0][0] == len(list(image_dir.iterdir()))


def test_report_build_disk_full_is_one_line(tmp_path, monkeypatch):
    import errno

    from report import build as report_build
    from report.cli import report

    db_path = tmp_path / "r.duckdb"
    ResultsDB(db_path).close()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_build, "build_site", full)
    monkeypatch.setattr("report.cli.build_site", full, raising=False)
    result = CliRunner().invoke(report, ["build", "--db", str(db_path), "--out", str(tmp_path / "site")])
    assert result.exit_code == 1 and result.output.startswith("Error: disk full while writing the site")
    assert len(result.output.strip().splitlines()) == 1
