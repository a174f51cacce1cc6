"""The downloads page (`downloads.html`): links to what report.downloads wrote."""

from __future__ import annotations

from typing import Any

from report import urls
from report.catalogue import RunInfo
from report.site import Site


def write_downloads_page(site: Site, runs: list[RunInfo], download_info: dict[str, Any]) -> None:
    site.render("downloads.html.j2", urls.DOWNLOADS, runs=runs, downloads=download_info, runs_here=runs)
