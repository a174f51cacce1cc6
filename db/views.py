"""SQL views over the result tables: the queries users reach for first."""

LENS_VIEWS = (
    # The top-1 token of every (layer, position) cell, with what that position is.
    """
    CREATE OR REPLACE VIEW lens_top1 AS
    SELECT l.run_id, l.image_id, l.layer, l.position, p.kind, p.patch_row, p.patch_col,
           p.label, l.token_id, l.token, l.prob
    FROM logit_lens l
    JOIN positions p USING (run_id, image_id, position)
    WHERE l.rank = 1
    """,
)
