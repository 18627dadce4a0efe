"""Sphinx configuration: the guides are Markdown (MyST); `make docs` builds them with warnings as errors."""

project = "grounded-diffusion"
author = "grounded-diffusion contributors"
copyright = "2026, grounded-diffusion contributors"  # noqa: A001 (Sphinx's name)
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
myst_heading_anchors = 3  # links to sections: guide.md#a-heading
html_theme = "furo"
html_title = "grounded-diffusion"
exclude_patterns = ["_build"]
