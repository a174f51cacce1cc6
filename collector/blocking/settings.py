"""Names and defaults of the blocking experiment, importable without torch (the CLI uses them)."""

from __future__ import annotations

REFERENCE_DEPTH = 32
# The paper's windows on 32-layer models, 0-based inclusive.
PRESETS_32: dict[str, tuple[int, int]] = {
    "early": (0, 9),
    "early_mid": (5, 14),
    "mid": (11, 20),
    "mid_late": (15, 24),
    "late": (21, 31),
    "all": (0, 31),
}
SOURCE_SETS = ("object_0", "object_1", "object_2", "image_minus_object_1", "image_minus_last_row")
TARGET_SETS = ("last", "last_row")
DEFAULT_WINDOW = 9
DEFAULT_BATCH_SIZE = 16
DEFAULT_AREA_RANGE = (1000.0, 2000.0)
DEFAULT_MAX_ANNOTATIONS = 3
