"""The results database schema, defined once as SQLAlchemy Core tables.

Every table the collector writes and the report reads is declared here. Migrations
(`db.migrations`) create these tables in order; a database records which migrations
it has applied in `schema_migrations`, as sqlite-utils does.

Column names are the contract users query with SQL: add columns, never rename.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()


def _pk(name: str, type_: sa.types.TypeEngine) -> sa.Column:
    # duckdb-engine maps autoincrementing integer keys to SERIAL, which DuckDB lacks.
    return sa.Column(name, type_, primary_key=True, autoincrement=False)


schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    _pk("version", sa.Integer),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("applied_at", sa.DateTime, nullable=False),
    sa.Column("tool_version", sa.String, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    _pk("run_id", sa.String),
    sa.Column("experiment", sa.String, nullable=False),
    sa.Column("model_id", sa.String, nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("status", sa.String, nullable=False),  # running | complete | failed
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("tool_version", sa.String, nullable=False),
    # The identity of a run: what must match for a rerun to resume it.
    sa.Column("run_key", sa.String, nullable=False, unique=True),
)

images = sa.Table(
    "images",
    metadata,
    _pk("image_id", sa.BigInteger),  # COCO id where known
    sa.Column("file_name", sa.String, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("source", sa.String, nullable=False),
)

annotations = sa.Table(
    "annotations",
    metadata,
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("annotation_id", sa.BigInteger, nullable=False),
    sa.Column("category_id", sa.Integer, nullable=False),
    sa.Column("category", sa.String, nullable=False),
    sa.Column("area", sa.Float, nullable=False),
    sa.Column("bbox", sa.ARRAY(sa.Float), nullable=False),  # COCO [x, y, w, h]
    sa.Column("iscrowd", sa.Boolean, nullable=False),
    sa.Column("segmentation", sa.JSON, nullable=False),  # COCO polygons or RLE
    sa.PrimaryKeyConstraint("image_id", "annotation_id"),
)

# One row per (run, image) once every row of that image is written: the resume marker.
run_images = sa.Table(
    "run_images",
    metadata,
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("n_positions", sa.Integer, nullable=False),
    sa.Column("n_layers", sa.Integer),
    sa.Column("grid_rows", sa.Integer, nullable=False),
    sa.Column("grid_cols", sa.Integer, nullable=False),
    sa.Column("written_at", sa.DateTime, nullable=False),
    sa.PrimaryKeyConstraint("run_id", "image_id"),
)

# The image exactly as the model saw it (de-normalised pixel_values), PNG-encoded,
# with the crop/resize that maps original pixels into it.
image_views = sa.Table(
    "image_views",
    metadata,
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("png", sa.LargeBinary, nullable=False),
    sa.Column("view_width", sa.Integer, nullable=False),
    sa.Column("view_height", sa.Integer, nullable=False),
    # original pixel (x, y) -> view pixel (x * scale_x - offset_x, y * scale_y - offset_y)
    sa.Column("scale_x", sa.Float, nullable=False),
    sa.Column("scale_y", sa.Float, nullable=False),
    sa.Column("offset_x", sa.Float, nullable=False),
    sa.Column("offset_y", sa.Float, nullable=False),
    sa.PrimaryKeyConstraint("run_id", "image_id"),
)

positions = sa.Table(
    "positions",
    metadata,
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("kind", sa.String, nullable=False),  # 'image' | 'text'
    sa.Column("patch_row", sa.Integer),  # null for text
    sa.Column("patch_col", sa.Integer),
    sa.Column("label", sa.String, nullable=False),  # token text, or <IMG001>...
    sa.Column("token_id", sa.Integer, nullable=False),
    sa.PrimaryKeyConstraint("run_id", "image_id", "position"),
)

logit_lens = sa.Table(
    "logit_lens",
    metadata,
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("layer", sa.SmallInteger, nullable=False),  # 0 = embeddings
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("rank", sa.SmallInteger, nullable=False),  # 1 = most likely
    sa.Column("token_id", sa.Integer, nullable=False),
    sa.Column("token", sa.String, nullable=False),
    sa.Column("prob", sa.Float, nullable=False),
)

# Per-image tables written in one transaction; deleting a (run, image) clears these.
PER_IMAGE_TABLES = (positions, logit_lens, image_views, run_images)
