"""Every experiment resolves to the same config as before the configs were split into shared base
files (experiments/base/) and overlays: the golden file holds each experiment's `fit`
configuration, merged, interpolated and with every default filled in, as ``--print_config`` prints
it. After an intended change of a config or a default, regenerate it and review the diff:

    .venv/bin/python tests/test_configs.py --update
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, print_config

GOLDEN = Path(__file__).parent / "data" / "resolved_configs.json"
# Overlays (they go after an experiment) are resolved with the experiment they are written for.
OVERLAID = {
    "experiments/offline.yaml": "experiments/pascal_split1.yaml",
    "experiments/protocol2/offline.yaml": "experiments/protocol2/pascal_maskformer.yaml",
    "experiments/protocol2/zs3_split.yaml": "experiments/pascal_split1.yaml",
    "experiments/protocol2/with_real_seen.yaml": "experiments/protocol2/pascal_maskformer.yaml",
    "experiments/protocol2/with_real_seen_coco.yaml": "experiments/protocol2/coco_maskformer.yaml",
    "experiments/protocol2/deeplabv3.yaml": "experiments/protocol2/pascal_maskformer.yaml",
    "experiments/protocol2/shapes_with_real_seen.yaml": "experiments/protocol2/shapes_segmenter.yaml",
    "experiments/protocol2/shapes_real_seen.yaml": "experiments/protocol2/shapes_segmenter.yaml",
    "experiments/protocol2/shapes_real_all.yaml": "experiments/protocol2/shapes_segmenter.yaml",
    "experiments/shapes_wide.yaml": "experiments/shapes.yaml",
    "experiments/world/wide.yaml": "experiments/world/text_to_image.yaml",
    "experiments/world/oracle_wide.yaml": "experiments/world/oracle.yaml",
    "experiments/shapes_dit.yaml": "experiments/shapes.yaml",
    "experiments/world/dit.yaml": "experiments/world/text_to_image.yaml",
    "experiments/world/dit_patch1.yaml": "experiments/world/text_to_image.yaml",
}
SKIPPED_FOLDERS = ("experiments/base/", "experiments/ablations/", "experiments/backbones/")


def experiments() -> list[str]:
    names = (str(p.relative_to(REPO)) for p in sorted((REPO / "experiments").rglob("*.yaml")))
    return [n for n in names if not n.startswith(SKIPPED_FOLDERS)]


def resolved(config: str) -> list[str]:
    """``fit --print_config`` of the config (after its experiment, for an overlay), line by line."""
    return print_config([OVERLAID[config], config] if config in OVERLAID else [config]).splitlines()


@pytest.mark.parametrize("config", experiments())
def test_every_experiment_resolves_as_before(config):
    golden = json.loads(GOLDEN.read_text())
    assert config in golden, f"{config} is new: regenerate {GOLDEN.name} (see this module's docstring)"
    assert resolved(config) == golden[config]


def test_the_golden_file_lists_no_removed_experiment():
    assert sorted(json.loads(GOLDEN.read_text())) == experiments()


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    GOLDEN.write_text(
        json.dumps({c: resolved(c) for c in experiments()}, indent=1, ensure_ascii=False) + "\n"
    )
    print(f"wrote {GOLDEN}")
