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

# Quantitative logit lens (Neo et al. §4.1): which lens cells at image positions name an
# annotated category of their image. A token names category c when, lowercased and
# stripped of whitespace and the SentencePiece/BPE word markers (U+2581, U+0120), it is
# c itself, c without spaces, one of c's words, or a piece (>= 3 characters) of c
# without spaces ("gir" for "giraffe"). One row per (cell, category) with the best
# (smallest) matching rank. The report runs the same SELECT (OBJECT_HITS_SELECT), so it
# also works on databases created before this view existed.
OBJECT_HITS_SELECT = r"""
    WITH cats AS (
        SELECT DISTINCT image_id, category, lower(category) AS name,
               replace(lower(category), ' ', '') AS joined
        FROM annotations
    ),
    cells AS (
        SELECT l.run_id, l.image_id, l.layer, l.position, l.rank,
               lower(regexp_replace(l.token, '^[\s\x{2581}\x{0120}]+|[\s\x{2581}]+$', '', 'g')) AS t
        FROM logit_lens l
        JOIN positions p USING (run_id, image_id, position)
        WHERE p.kind = 'image'
    )
    SELECT c.run_id, c.image_id, c.layer, c.position, a.category, min(c.rank) AS best_rank
    FROM cells c
    JOIN cats a ON a.image_id = c.image_id
    WHERE c.t <> ''
      AND (c.t = a.name OR c.t = a.joined OR list_contains(string_split(a.name, ' '), c.t)
           OR (length(c.t) >= 3 AND contains(a.joined, c.t)))
    GROUP BY c.run_id, c.image_id, c.layer, c.position, a.category
"""

QUANT_VIEWS = (f"CREATE OR REPLACE VIEW lens_object_hits AS {OBJECT_HITS_SELECT}",)

# Token ablation (Neo et al. §5): among the images a setting answers correctly with
# nothing ablated (condition 'none'), the share that become incorrect under each
# condition. mean_tokens_ablated averages over those same baseline-correct images.
ABLATION_VIEWS = (
    """
    CREATE OR REPLACE VIEW ablation_summary AS
    SELECT a.run_id, a.condition, a.setting,
           count(*) AS n_baseline_correct,
           count(*) FILTER (WHERE NOT a.correct) AS n_flipped,
           100.0 * count(*) FILTER (WHERE NOT a.correct) / count(*) AS pct_flipped,
           avg(a.n_ablated) AS mean_tokens_ablated
    FROM ablations a
    JOIN (SELECT run_id, image_id, setting FROM ablations WHERE condition = 'none' AND correct) b
      USING (run_id, image_id, setting)
    GROUP BY a.run_id, a.condition, a.setting
    """,
)

# Attention blocking (Neo et al. §6): accuracy of the class answer per blocking condition
# (source set, target set, layer window). relative_accuracy divides by the baseline
# accuracy (nothing blocked) of the same images: every row is joined to its image's
# baseline row, so images without a baseline never count. The baseline appears as its own
# rows (window_kind 'baseline', relative_accuracy 1 where its accuracy is not 0).
BLOCKING_VIEWS = (
    """
    CREATE OR REPLACE VIEW blocking_curves AS
    SELECT b.run_id, b.source, b.target, b.layer_start, b.layer_end, b.window_kind, b.preset,
           count(*) AS n,
           avg(b.correct::DOUBLE) AS accuracy,
           avg(b.target_prob) AS mean_target_prob,
           avg(b.correct::DOUBLE) / nullif(avg(base.correct::DOUBLE), 0) AS relative_accuracy
    FROM blocking b
    JOIN (SELECT run_id, image_id, correct FROM blocking WHERE window_kind = 'baseline') base
      USING (run_id, image_id)
    GROUP BY b.run_id, b.source, b.target, b.layer_start, b.layer_end, b.window_kind, b.preset
    """,
)
