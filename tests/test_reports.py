"""Paper Tab. 1 aggregated over splits."""

import json

import pytest

from grounded_diffusion import reports
from grounded_diffusion.data.prompts import GROUPS


def run(ours: float, daam: float, missing: str | None = None, scored_other_object: bool = True) -> dict:
    def groups(value):
        table = {g: {"miou": None if g == missing else value, "image_noun_miou": value / 2} for g in GROUPS}
        if scored_other_object:  # metrics.json files written before it existed lack it
            for g in GROUPS:
                table[g]["on_other_object"] = value / 10 if g.startswith("two") else None
        return table

    return {"groups": {"ours": groups(ours), "daam": groups(daam)}}


def test_splits_are_averaged_per_group_and_written(tmp_path, capsys):
    paths = []
    for number, (ours, daam, missing) in enumerate([(90, 60, None), (80, 50, "two_unseen"), (70, 40, None)], 1):
        path = tmp_path / f"metrics{number}.json"
        path.write_text(json.dumps(run(ours, daam, missing, scored_other_object=number != 3)))
        paths.append(str(path))
    reports.main([*paths, "--name", "PASCAL-sim", "--out", str(tmp_path / "table")])
    report = json.loads((tmp_path / "table" / "report.json").read_text())
    ours = report["methods"]["ours"]["mean"]
    assert ours["one_seen"]["miou"] == pytest.approx(80)
    assert ours["two_unseen"]["miou"] == pytest.approx(80)  # a split without the group is left out
    assert report["methods"]["daam"]["mean"]["one_seen"]["image_noun_miou"] == pytest.approx(25)
    assert ours["two_seen"]["on_other_object"] == pytest.approx(8.5)  # splits 1 and 2 scored it
    assert ours["one_seen"]["on_other_object"] is None
    text = (tmp_path / "table" / "report.md").read_text()
    assert "| PASCAL-sim, ours | 80.00 | 80.00 | 80.00 | 80.00 | 80.00 |" in text
    assert "| PASCAL-sim, DAAM | – | – | 5.50 | 5.50 | 5.50 |" in text  # on the other object
    assert "| split 2, DAAM | 50.00 (25.00) |" in text and "– (25.00)" in text
    assert capsys.readouterr().out.strip().endswith("report.json")


def test_old_metrics_without_groups_are_refused(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"miou": 1.0}))
    with pytest.raises(SystemExit):
        reports.main([str(path), "--out", str(tmp_path / "x")])


def test_table2_marks_real_training_data_as_seen_only_or_all_classes():
    def row(name, real_seen, real_all, synthetic):
        return {"name": name, "vocabulary": "shapes", "architecture": "lraspp", "real_seen": real_seen, "real_all": real_all,
                "synthetic": synthetic, "background": "ignore", "num_seen": 15, "num_unseen": 5, "unseen": ["red circle"],
                "seen_miou": 70.0, "unseen_miou": 0.0, "harmonic_miou": 0.0}  # fmt: skip

    rows = [row("zs3", True, False, ""), row("ours", False, False, "mixture"), row("upper", False, True, "")]
    text = reports.table2_markdown(reports.table2(rows))
    assert "## shapes world (mIoU %, background ignored; unseen: red circle)" in text
    assert "| zs3 | lraspp | ✓ | ✗ |" in text and "| ours | lraspp | ✗ | mixture |" in text and "| upper | lraspp | all 20 | ✗ |" in text
