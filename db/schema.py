"""The results database schema, defined once as SQLAlchemy Core tables.

Every table the collector writes and the report reads is declared here. Migrations
(`db.migrations`) create these tables in order; a database records which migrations
it has applied in `schema_migrations`, as sqlite-utils does.

Column names are the contract users query with SQL: add columns, never rename.
"""

# No `from __future__ import annotations` here: the table `annotations` below would clash with it.

import sqlalchemy as sa

metadata = sa.MetaData()


def _pk(name: str, type_: type[sa.types.TypeEngine] | sa.types.TypeEngine) -> sa.Column:
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

# Further views of the image the model saw besides image_views (e.g. LLaVA-NeXT's
# stitched high-resolution tiles), PNG-encoded, each with the grid of the positions of
# its `kind`: a position of that kind has its cell of this grid in (patch_row, patch_col).
extra_views = sa.Table(
    "extra_views",
    metadata,
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("name", sa.String, nullable=False),  # e.g. 'high_res'
    sa.Column("kind", sa.String, nullable=False),  # positions.kind on this grid, e.g. 'image_hr'
    sa.Column("png", sa.LargeBinary, nullable=False),
    sa.Column("view_width", sa.Integer, nullable=False),
    sa.Column("view_height", sa.Integer, nullable=False),
    sa.Column("grid_rows", sa.Integer, nullable=False),
    sa.Column("grid_cols", sa.Integer, nullable=False),
    sa.PrimaryKeyConstraint("run_id", "image_id", "name"),
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


# Why an image was left out of an experiment (curation, cut away by the crop, ...), so
# users can count what was dropped. Written in the image's transaction, with its marker.
skipped = sa.Table(
    "skipped",
    metadata,
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.String, nullable=False),  # short code, e.g. 'baseline_incorrect'
    sa.Column("detail", sa.String),
    sa.PrimaryKeyConstraint("run_id", "image_id", "reason"),
)

# Mean post-projector image-token embeddings, the replacement vector of token ablation.
mean_vectors = sa.Table(
    "mean_vectors",
    metadata,
    _pk("vector_id", sa.String),
    sa.Column("model_id", sa.String, nullable=False),
    sa.Column("hidden_size", sa.Integer, nullable=False),
    sa.Column("n_images", sa.Integer, nullable=False),
    sa.Column("n_tokens", sa.BigInteger, nullable=False),
    sa.Column("vector", sa.ARRAY(sa.Float), nullable=False),
    sa.Column("source", sa.String, nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)

ablations = sa.Table(
    "ablations",
    metadata,
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("category", sa.String, nullable=False),
    sa.Column("condition", sa.String, nullable=False),  # none, object_0, register, random_10, ...
    sa.Column("setting", sa.String, nullable=False),  # generative | polling | vqa
    sa.Column("positions", sa.ARRAY(sa.Integer), nullable=False),  # LM input positions replaced
    sa.Column("n_ablated", sa.Integer, nullable=False),
    sa.Column("correct", sa.Boolean, nullable=False),
    sa.Column("answer", sa.String),  # generated text (generative, polling)
    sa.Column("question", sa.String),
    sa.Column("predicted_token", sa.String),  # vqa: next-token prediction
    sa.Column("predicted_prob", sa.Float),
    sa.Column("target_token", sa.String),  # vqa: first token of the class name
    sa.Column("target_prob", sa.Float),
    sa.Column("seed", sa.BigInteger),  # random_k draws
)

blocking = sa.Table(
    "blocking",
    metadata,
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("category", sa.String, nullable=False),
    sa.Column("source", sa.String, nullable=False),  # blocked key positions: object_1, ... ('none' = baseline)
    sa.Column("target", sa.String, nullable=False),  # blocked query positions: last, last_row
    sa.Column("layer_start", sa.Integer),  # 0-based inclusive window; null for the baseline
    sa.Column("layer_end", sa.Integer),
    sa.Column("window_kind", sa.String, nullable=False),  # baseline | preset | sliding
    sa.Column("preset", sa.String),  # early, early_mid, mid, mid_late, late, all
    sa.Column("correct", sa.Boolean, nullable=False),
    sa.Column("question", sa.String),
    sa.Column("predicted_token", sa.String),
    sa.Column("predicted_prob", sa.Float),
    sa.Column("target_token", sa.String),
    sa.Column("target_prob", sa.Float),
    sa.Column("source_positions", sa.ARRAY(sa.Integer)),
    sa.Column("target_positions", sa.ARRAY(sa.Integer)),
)

# The first token of each annotated category's name in the run's tokenizer (the token that
# starts the word, tokenized in context as the VQA answer does), one row per (run, image,
# category): the 'first_token' lens hit rule matches lens cells by this id.
class_tokens = sa.Table(
    "class_tokens",
    metadata,
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("image_id", sa.BigInteger, nullable=False),
    sa.Column("category", sa.String, nullable=False),
    sa.Column("token_id", sa.BigInteger, nullable=False),
    sa.Column("token", sa.String),
    sa.PrimaryKeyConstraint("run_id", "image_id", "category"),
)

# The tokenizer's own piece (`convert_ids_to_tokens`) beside the decoded text of every
# token id a lens run's rows or positions name, once per (run, token id), not per lens row.
# Decoded text alone hides what a token is: SentencePiece's lone word marker "▁"
# (id 29871 in LLaVA-1.5) decodes to "", the byte-fallback piece "<0x0A>" to a newline
# and "<0xE2>" to U+FFFD. Runs written before migration 9 have no rows here (the report
# then shows the decoded text alone).
token_pieces = sa.Table(
    "token_pieces",
    metadata,
    sa.Column("run_id", sa.String, nullable=False),
    sa.Column("token_id", sa.Integer, nullable=False),
    sa.Column("piece", sa.String, nullable=False),  # "" where the tokenizer has no piece for the id
    sa.Column("text", sa.String, nullable=False),  # tokenizer.decode([token_id]), as logit_lens.token
    sa.PrimaryKeyConstraint("run_id", "token_id"),
)
