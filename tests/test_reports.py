"""Paper Tab. 1 aggregated over splits."""

import json

import pytest

from grounded_diffusion import reports
from grounded_diffusion.data.prompts import GROUPS


def run(ours: float, daam: float, missing: str | None = None) -> dict:
    def groups(value):
        return {g: {"miou": None if g == missing else value, "image_noun_miou": value / 2} for g in GROUPS}

    return {"groups": {"ours": groups(ours), "daam": groups(daam)}}


def test_splits_are_averaged_per_group_and_written(tmp_path, capsys):
    paths = []
    for number, (ours, daam, missing) in enumerate([(90, 60, None), (80, 50, "two_unseen"), (70, 40, None)], 1):
        path = tmp_path / f"metrics{number}.json"
        path.write_text(json.dumps(run(ours, daam, missing)))
        paths.append(str(path))
    reports.main([*paths, "--name", "PASCAL-sim", "--out", str(tmp_path / "table")])
    report = json.loads((tmp_path / "table" / "report.json").read_text())
    ours = report["methods"]["ours"]["mean"]
    assert ours["one_seen"]["miou"] == pytest.approx(80)
    assert ours["two_unseen"]["miou"] == pytest.approx(80)  # a split without the group is left out
    assert report["methods"]["daam"]["mean"]["one_seen"]["image_noun_miou"] == pytest.approx(25)
    text = (tmp_path / "table" / "report.md").read_text()
    assert "| PASCAL-sim, ours | 80.00 | 80.00 | 80.00 | 80.00 | 80.00 |" in text
    assert "| split 2, DAAM | 50.00 (25.00) |" in text and "– (25.00)" in text
    assert capsys.readouterr().out.strip().endswith("report.json")


def test_old_metrics_without_groups_are_refused(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"miou": 1.0}))
    with pytest.raises(SystemExit):
        reports.main([str(path), "--out", str(tmp_path / "x")])
