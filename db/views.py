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
# annotated category of their image, under a named hit rule (the rule is stored with each
# row of `lens_object_hits`; the paper does not pin one down):
#
# - 'word': the token, lowercased and stripped of whitespace and the SentencePiece/BPE
#   word markers (U+2581, U+0120), is the category name, the name without spaces, or one
#   of its words ("cat" for "cat", "table" or "diningtable" for "dining table"). A word
#   piece ("gir" for "giraffe", "ing" for "dining") does not count.
# - 'first_token': the token id is the first token of the category name in the run's own
#   tokenizer (table `class_tokens`, written by the lens collector), the token the VQA
#   setting scores; it counts word pieces that start the name ("gir") and nothing else.
#
# One row per (cell, category, rule) with the best (smallest) matching rank.
# OBJECT_HITS_SELECT is the 'word' rule alone with the original columns, which the report
# runs itself so that it also works on databases created before these views existed.
_NORMALISED_TOKEN = r"lower(regexp_replace(l.token, '^[\s\x{2581}\x{0120}]+|[\s\x{2581}]+$', '', 'g'))"
NORMALISED_TOKEN = _NORMALISED_TOKEN  # the word rule's token normalisation (of column l.token)

OBJECT_HITS_SELECT = rf"""
    WITH cats AS (
        SELECT DISTINCT image_id, category, lower(category) AS name,
               replace(lower(category), ' ', '') AS joined
        FROM annotations
    ),
    cells AS (
        SELECT l.run_id, l.image_id, l.layer, l.position, l.rank, {_NORMALISED_TOKEN} AS t
        FROM logit_lens l
        JOIN positions p USING (run_id, image_id, position)
        WHERE p.kind = 'image'
    )
    SELECT c.run_id, c.image_id, c.layer, c.position, a.category, min(c.rank) AS best_rank
    FROM cells c
    JOIN cats a ON a.image_id = c.image_id
    WHERE c.t <> ''
      AND (c.t = a.name OR c.t = a.joined OR list_contains(string_split(a.name, ' '), c.t))
    GROUP BY c.run_id, c.image_id, c.layer, c.position, a.category
"""

FIRST_TOKEN_HITS_SELECT = r"""
    SELECT l.run_id, l.image_id, l.layer, l.position, k.category, min(l.rank) AS best_rank
    FROM logit_lens l
    JOIN positions p USING (run_id, image_id, position)
    JOIN class_tokens k ON k.run_id = l.run_id AND k.image_id = l.image_id AND k.token_id = l.token_id
    WHERE p.kind = 'image'
    GROUP BY l.run_id, l.image_id, l.layer, l.position, k.category
"""

HIT_RULES = ("word", "first_token")

QUANT_VIEWS = (f"CREATE OR REPLACE VIEW lens_object_hits AS {OBJECT_HITS_SELECT}",)

# Migration 8 replaces the view with one row per rule.
HIT_RULE_VIEWS = (
    f"""
    CREATE OR REPLACE VIEW lens_object_hits AS
    SELECT run_id, image_id, layer, position, category, 'word' AS rule, best_rank FROM ({OBJECT_HITS_SELECT})
    UNION ALL
    SELECT run_id, image_id, layer, position, category, 'first_token' AS rule, best_rank
    FROM ({FIRST_TOKEN_HITS_SELECT})
    """,
)


def wilson_sql(successes: str, n: str, bound: str) -> str:
    """SQL for the 95% Wilson score interval bound ('low' or 'high') of successes / n, as a
    fraction (NULL when n = 0). Same formula as `db.stats.wilson_interval`."""
    sign = "-" if bound == "low" else "+"
    p, z2 = f"(({successes})::DOUBLE / nullif({n}, 0))", "3.8414588206941254"  # 1.959964^2
    return (
        f"greatest(0.0, least(1.0, ({p} + {z2} / (2.0 * {n}) {sign} 1.959963984540054 * "
        f"sqrt({p} * (1 - {p}) / {n} + {z2} / (4.0 * {n} * {n}))) / (1 + {z2} / {n})))"
    )


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
           avg(a.n_ablated) AS mean_tokens_ablated,
           100.0 * {flip_low} AS pct_flipped_ci_low,
           100.0 * {flip_high} AS pct_flipped_ci_high
    FROM ablations a
    JOIN (SELECT run_id, image_id, setting FROM ablations WHERE condition = 'none' AND correct) b
      USING (run_id, image_id, setting)
    GROUP BY a.run_id, a.condition, a.setting
    """.format(
        flip_low=wilson_sql("count(*) FILTER (WHERE NOT a.correct)", "count(*)", "low"),
        flip_high=wilson_sql("count(*) FILTER (WHERE NOT a.correct)", "count(*)", "high"),
    ),
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
           avg(b.correct::DOUBLE) / nullif(avg(base.correct::DOUBLE), 0) AS relative_accuracy,
           {acc_low} AS accuracy_ci_low,
           {acc_high} AS accuracy_ci_high
    FROM blocking b
    JOIN (SELECT run_id, image_id, correct FROM blocking WHERE window_kind = 'baseline') base
      USING (run_id, image_id)
    GROUP BY b.run_id, b.source, b.target, b.layer_start, b.layer_end, b.window_kind, b.preset
    """.format(
        acc_low=wilson_sql("count(*) FILTER (WHERE b.correct)", "count(*)", "low"),
        acc_high=wilson_sql("count(*) FILTER (WHERE b.correct)", "count(*)", "high"),
    ),
)
