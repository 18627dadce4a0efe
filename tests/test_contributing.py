"""CONTRIBUTING.md's "Adding ..." steps stay true: every file they name exists, and every
registry or class they name (in backticks, beside its file) is defined there."""

from __future__ import annotations

import re

from conftest import REPO

SECTIONS = (
    "## Adding a UNet backbone",
    "## Adding a diffusion-transformer family",
    "## Adding a dataset source",
)
SECTIONS += ("## Adding a baseline method",)


def steps(heading: str) -> str:
    text = (REPO / "CONTRIBUTING.md").read_text()
    assert heading in text, f"CONTRIBUTING.md lost its section {heading!r}"
    return text[text.index(heading) :].split("\n## ", 1)[0]


def test_every_file_the_steps_name_exists():
    for heading in SECTIONS:
        for path in re.findall(
            r"`((?:grounded_diffusion|tests|callbacks|lightning_modules|experiments)/[\w/.]+)`",
            steps(heading),
        ):
            assert (REPO / path).exists(), f"{heading}: {path} does not exist"


def test_every_name_the_steps_give_beside_a_file_is_defined_in_it():
    """A step names ``NAME`` (a registry, class or function: capitals or an underscore) and then its
    file: ``NAME` (`file.py`)`` or ``file.py` (`NAME`)``."""
    checked = 0
    for heading in SECTIONS:
        text = steps(heading)
        pairs = re.findall(r"`(\w+)`[^`\n]{0,12}\(`([\w/]+\.py)`", text)
        pairs += [(n, f) for f, n in re.findall(r"`([\w/]+\.py)` \(`(\w+)`", text)]
        for name, file in pairs:
            if not re.search(r"[A-Z_]", name):
                continue  # (a word such as `predict`, not a code name)
            path = next(
                (p for p in (REPO / file, REPO / "grounded_diffusion/models" / file) if p.exists()), None
            )
            assert path is not None, f"{heading}: {file} does not exist"
            defined = rf"^(?:class|def) {name}\b|^{name}\b[^=\n]*=|^    def {name}\b|^    {name}\b"
            assert re.search(defined, path.read_text(), re.M), f"{heading}: {name} is not defined in {file}"
            checked += 1
    assert checked >= 8  # (the pattern still finds the steps' pairs)
