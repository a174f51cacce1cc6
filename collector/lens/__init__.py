"""The logit lens: `lens` (reading hidden states as next-token distributions) and
`experiment` (the per-image work of `llava-interp collect lens`, run by `collector.runner`)."""

from collector.lens.lens import Lens, LensTopK, LogitLens

__all__ = ["Lens", "LensTopK", "LogitLens"]
