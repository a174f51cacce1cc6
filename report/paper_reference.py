"""The paper's headline results (Neo et al., arXiv 2410.07149), the values the Reproduction
page puts beside ours. Data only: no torch, no database.

Every value carries where it comes from and whether it was checked against the paper
itself. The values reached this project through a third-party replication's summary of
the paper (issue #14); each was then looked up in the paper. Only the abstract could be
read (arxiv.org/html/2410.07149v2, its abstract: "object identification accuracy drops by
over 70% when object-specific tokens are removed"); no table or figure of the paper could
be read, so no exact value below is verified. Where the abstract supports a value
qualitatively, `support` says so; `verified` stays False until someone checks the table or
figure named in `where` and changes it here.

`measure` names the quantity in `db.reproduction` that the value is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER = "Neo et al., Towards Interpreting Visual Information Processing in Vision-Language Models (arXiv 2410.07149)"
PAPER_URL = "https://arxiv.org/abs/2410.07149"
REPLICATION_SUMMARY = "third-party replication's summary of the paper, quoted in issue #14"
ABSTRACT_CLAIM = (
    "abstract (arxiv.org/html/2410.07149v2): 'object identification accuracy drops by over 70% when "
    "object-specific tokens are removed'"
)


@dataclass(frozen=True)
class PaperValue:
    """One headline value of the paper.

    value: in `unit` ('%' for percentages 0-100, 'share' for 0-1, 'layer' for a hidden-state
    index whose count is `of_layers`); measure and targets: the `db.reproduction` records it is
    compared with (`Measured.measure`, `Measured.target`: the setting of an ablation,
    'source|target|preset' of a blocking condition, '' for the lens); verified: checked in the
    paper itself at `where`.
    """

    id: str
    description: str
    model: str
    measure: str
    targets: tuple[str, ...]
    value: float
    unit: str
    verified: bool
    source: str
    where: str
    support: str | None = None
    of_layers: int | None = None


LLAVA15 = "llava-hf/llava-1.5-7b-hf"
QWEN2VL = "Qwen/Qwen2-VL-2B-Instruct"

_ABLATION_WHERE = "§5 token ablation results table (LLaVA-1.5-7B), not read"
_LENS_WHERE = "§4.1 quantitative logit lens, not read"
_BLOCKING_WHERE = "§6 attention knockout figures, not read"
_QWEN_WHERE = (
    "not located: the paper's code (github.com/clemneo/llava-interp) covers LLaVA-1.5 and LLaVA-Phi only, and "
    "the paper's text beyond its abstract could not be read; may be the replication's own measurement"
)

PAPER_VALUES: tuple[PaperValue, ...] = (
    PaperValue(
        "ablation-object1-generative",
        "object tokens + 1 buffer ablated (about 33 of 576 tokens): answers flipped",
        LLAVA15,
        "ablation_object_flip",
        ("generative",),
        71.8,
        "%",
        False,
        REPLICATION_SUMMARY,
        _ABLATION_WHERE,
        support=ABSTRACT_CLAIM + " (consistent with 71.8%, not the exact value)",
    ),
    PaperValue(
        "ablation-object1-polling",
        "object tokens + 1 buffer ablated: answers flipped",
        LLAVA15,
        "ablation_object_flip",
        ("polling",),
        51.3,
        "%",
        False,
        REPLICATION_SUMMARY,
        _ABLATION_WHERE,
    ),
    PaperValue(
        "ablation-object1-vqa",
        "object tokens + 1 buffer ablated: answers flipped",
        LLAVA15,
        "ablation_object_flip",
        ("vqa",),
        86.7,
        "%",
        False,
        REPLICATION_SUMMARY,
        _ABLATION_WHERE,
        support=ABSTRACT_CLAIM + " (consistent with 86.7%, not the exact value)",
    ),
    PaperValue(
        "ablation-random40-generative",
        "40 random image tokens ablated: answers flipped",
        LLAVA15,
        "ablation_random_flip",
        ("generative",),
        2.4,
        "%",
        False,
        REPLICATION_SUMMARY,
        _ABLATION_WHERE,
    ),
    PaperValue(
        "ablation-random40-polling",
        "40 random image tokens ablated: answers flipped",
        LLAVA15,
        "ablation_random_flip",
        ("polling",),
        0.0,
        "%",
        False,
        REPLICATION_SUMMARY,
        _ABLATION_WHERE,
    ),
    PaperValue(
        "ablation-random40-vqa",
        "40 random image tokens ablated: answers flipped",
        LLAVA15,
        "ablation_random_flip",
        ("vqa",),
        0.0,
        "%",
        False,
        REPLICATION_SUMMARY,
        _ABLATION_WHERE,
    ),
    PaperValue(
        "lens-hit-share-llava15",
        "logit lens: object-patch positions where the class name is decoded",
        LLAVA15,
        "lens_hit_share",
        ("",),
        23.7,
        "%",
        False,
        REPLICATION_SUMMARY,
        _LENS_WHERE,
    ),
    PaperValue(
        "lens-mean-layer-llava15",
        "logit lens: mean layer at which the class name is decoded at those positions",
        LLAVA15,
        "lens_mean_layer",
        ("",),
        25.7,
        "layer",
        False,
        REPLICATION_SUMMARY,
        _LENS_WHERE,
        of_layers=33,
    ),
    PaperValue(
        "lens-hit-share-qwen2vl",
        "logit lens: object-patch positions where the class name is decoded",
        QWEN2VL,
        "lens_hit_share",
        ("",),
        6.5,
        "%",
        False,
        REPLICATION_SUMMARY,
        _QWEN_WHERE,
    ),
    PaperValue(
        "lens-mean-layer-qwen2vl",
        "logit lens: mean layer at which the class name is decoded at those positions",
        QWEN2VL,
        "lens_mean_layer",
        ("",),
        25.1,
        "layer",
        False,
        REPLICATION_SUMMARY,
        _QWEN_WHERE,
        of_layers=29,
    ),
    PaperValue(
        "blocking-object1-last-mid-late",
        "object + 1 buffer blocked from the last position in mid-late layers (15-24 of 32): accuracy kept",
        LLAVA15,
        "blocking_kept",
        ("object_1|last|mid_late",),
        0.82,
        "share",
        False,
        REPLICATION_SUMMARY,
        _BLOCKING_WHERE,
    ),
    PaperValue(
        "blocking-object1-last-all",
        "object + 1 buffer blocked from the last position in all layers: accuracy kept",
        LLAVA15,
        "blocking_kept",
        ("object_1|last|all",),
        0.67,
        "share",
        False,
        REPLICATION_SUMMARY,
        _BLOCKING_WHERE,
    ),
    PaperValue(
        "blocking-image-last-row-all",
        "image tokens blocked from the last row of image tokens (all layers): accuracy kept; which image "
        "tokens is not stated, and the paper's code blocks the object + 1 buffer from the last row "
        "(PATCH_PLUS_ONE_TO_LAST_ROW_* in scripts/attention_experiment_curate.py), so both are shown",
        LLAVA15,
        "blocking_kept",
        ("image_minus_last_row|last_row|all", "object_1|last_row|all"),
        1.00,
        "share",
        False,
        REPLICATION_SUMMARY,
        _BLOCKING_WHERE,
    ),
)


def by_id() -> dict[str, PaperValue]:
    return {value.id: value for value in PAPER_VALUES}
