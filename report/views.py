"""The pictures of the site: each image as the model saw it (the `image_views` and
`extra_views` PNGs of the database), next to its lens page and its ablation or blocking
image page, and as the index's thumbnails.

A view of a real photo is about 225 KB as PNG (a 336x336 COCO image), so 5,000 of them
alone pass GitHub Pages' 1 GB; as JPEG at JPEG_QUALITY it is about 29 KB (a mean absolute
error of 4.4 of 255 per channel on that image). `report build
--views` chooses per run: "png" publishes the database's bytes as they are, "jpeg"
re-encodes them, "auto" is jpeg for a run with more than JPEG_VIEW_PAGES image pages (the
same scale at which the lens pages read their cells from the Parquet downloads) and png
otherwise. The database keeps the exact PNGs either way; the downloads leave them out.
"""

from __future__ import annotations

import io

from PIL import Image

VIEW_FORMATS = ("auto", "png", "jpeg")
JPEG_VIEW_PAGES = 200
JPEG_QUALITY = 85
EXTENSIONS = {"png": "png", "jpeg": "jpg"}


def choose(view_format: str, pages: int) -> tuple[str, str]:
    """("png" or "jpeg", why) for a run with `pages` image pages under `report build --views`."""
    if view_format not in VIEW_FORMATS:
        raise ValueError(f"unknown view format {view_format!r} (one of {', '.join(VIEW_FORMATS)})")
    if view_format != "auto":
        return view_format, f"--views {view_format}"
    if pages > JPEG_VIEW_PAGES:
        return "jpeg", f"{pages} image pages, over {JPEG_VIEW_PAGES}: JPEG quality {JPEG_QUALITY}"
    return "png", f"{pages} image pages, at most {JPEG_VIEW_PAGES}: the database's PNGs"


def encode(png: bytes, view_format: str) -> bytes:
    """The published bytes of a view stored as `png`: the same bytes for "png", JPEG at
    JPEG_QUALITY for "jpeg" (4:2:0 chroma: 7-pixel colour resolution, finer than the
    14-pixel patches of a 336-pixel LLaVA view; a transparent pixel shows over white)."""
    if view_format == "png":
        return png
    if view_format != "jpeg":
        raise ValueError(f"unknown view format {view_format!r}")
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            rgb = Image.new("RGB", rgba.size, (255, 255, 255))
            rgb.paste(rgba, mask=rgba.getchannel("A"))
        else:
            rgb = image.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()
