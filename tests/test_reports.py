"""Paper Tab. 1 aggregated over splits."""

import json

import pytest

from grounded_diffusion import reports
from grounded_diffusion.data.prompts import GROUPS


def run(
    ours: float,
    daam: float,
    missing: str | None = None,
    scored_other_object: bool = True,
    method: str = "daam",
) -> dict:
    def groups(value):
        table = {g: {"miou": None if g == missing else value, "image_noun_miou": value / 2} for g in GROUPS}
        if scored_other_object:  # metrics.json files written before it existed lack it
            for g in GROUPS:
                table[g]["on_other_object"] = value / 10 if g.startswith("two") else None
        return table

    return {"training_free": [method], "groups": {"ours": groups(ours), method: groups(daam)}}


def test_splits_are_averaged_per_group_and_written(tmp_path, capsys):
    paths = []
    for number, (ours, daam, missing) in enumerate(
        [(90, 60, None), (80, 50, "two_unseen"), (70, 40, None)], 1
    ):
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


def test_a_transformer_baseline_is_reported_by_its_name(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(run(90, 60, method="joint_attention")))
    reports.main([str(path), "--name", "shapes", "--out", str(tmp_path / "table")])
    report = json.loads((tmp_path / "table" / "report.json").read_text())
    assert list(report["methods"]) == ["ours", "joint_attention"]
    text = (tmp_path / "table" / "report.md").read_text()
    assert "| shapes, joint attention | 60.00 |" in text and "DAAM" not in text


def test_metrics_from_before_methods_were_named_are_read_with_a_notice(tmp_path, capsys):
    """metrics.json as written before baselines were keyed by method: the baseline under "daam"
    whatever the backbone, its τ under daam_threshold and the tuned one under daam_tuned."""
    old = run(90, 60)
    del old["training_free"]
    old.update(daam_threshold=0.4, daam_tuned={"threshold": 0.6, "groups": {}})
    old["unfiltered"] = {**old, "unfiltered": None}
    del old["unfiltered"]["unfiltered"]
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(old))
    metrics = reports.read_metrics(path)
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and str(path) in notice[0] and "'daam'" in notice[0]
    for results in (metrics, metrics["unfiltered"]):
        assert results["training_free"] == ["daam"] and results["thresholds"] == {"daam": 0.4}
        assert results["tuned"]["daam"]["threshold"] == 0.6 and "daam_tuned" not in results
    new = tmp_path / "new.json"
    new.write_text(json.dumps(run(90, 60, method="joint_attention")))
    assert reports.read_metrics(new)["training_free"] == ["joint_attention"]
    assert capsys.readouterr().err == ""  # no notice for this version's files


def test_old_metrics_without_groups_are_refused(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"miou": 1.0}))
    with pytest.raises(SystemExit):
        reports.main([str(path), "--out", str(tmp_path / "x")])


def zs3_run(name, real_seen, real_all, synthetic, seen=70.0, unseen=0.0, harmonic=0.0) -> dict:
    return {
        "name": name,
        "vocabulary": "shapes",
        "architecture": "lraspp",
        "real_seen": real_seen,
        "real_all": real_all,
        "synthetic": synthetic,
        "background": "ignore",
        "num_seen": 15,
        "num_unseen": 5,
        "unseen": ["red circle"],
        "seen_miou": seen,
        "unseen_miou": unseen,
        "harmonic_miou": harmonic,
    }


def test_table2_marks_real_training_data_as_seen_only_or_all_classes():
    rows = [
        zs3_run("zs3", True, False, ""),
        zs3_run("ours", False, False, "mixture"),
        zs3_run("upper", False, True, ""),
    ]
    text = reports.table2_markdown(reports.table2(rows))
    assert "## shapes world (mIoU %, background ignored; unseen: red circle)" in text
    assert (
        "| zs3 | lraspp | ✓ | ✗ | 70.00 | 0.00 | 0.00 |" in text and "| ours | lraspp | ✗ | mixture |" in text
    )
    assert (
        "| upper | lraspp | all 20 | ✗ |" in text and "runs" not in text
    )  # one run a row: the table as before


def test_table2_averages_the_seeds_of_a_row_and_lists_every_run(tmp_path):
    runs = [
        zs3_run("shapes_synthetic_lraspp", False, False, "mixture", 50.0, 60.0, 54.5),
        zs3_run("shapes_real_seen_lraspp", True, False, ""),
        zs3_run("shapes_synthetic_lraspp_seed1", False, False, "mixture", 54.0, 64.0, 58.5),
        zs3_run("shapes_synthetic_lraspp_seed2", False, False, "mixture", 52.0, 68.0, 59.0),
    ]
    paths = []
    for number, run in enumerate(runs):
        paths.append(tmp_path / f"{number}.json")
        paths[-1].write_text(json.dumps(run))
    reports.main(["--table", "2", "--out", str(tmp_path / "table2"), *map(str, paths)])
    report = json.loads((tmp_path / "table2" / "report.json").read_text())
    synthetic, real = report["rows"]["shapes world"]  # in the order first seen
    assert synthetic["runs"] == 3 and real["runs"] == 1 and real["seen_miou_sd"] is None
    assert synthetic["seen_miou"] == pytest.approx(52) and synthetic["seen_miou_sd"] == pytest.approx(
        2
    )  # sample sd
    assert synthetic["unseen_miou"] == pytest.approx(64) and synthetic["unseen_miou_sd"] == pytest.approx(4)
    text = (tmp_path / "table2" / "report.md").read_text()
    assert (
        "| run | segmenter | Real / 15 | Synthetic / 15+5 (# objects) | runs | seen | unseen | harmonic |"
        in text
    )
    assert (
        "| shapes_synthetic_lraspp | lraspp | ✗ | mixture | 3 | 52.00 ± 2.00 | 64.00 ± 4.00 | 57.33 ± 2.47 |"
        in text
    )
    assert "| shapes_real_seen_lraspp | lraspp | ✓ | ✗ | 1 | 70.00 | 0.00 | 0.00 |" in text
    assert (
        "| shapes_synthetic_lraspp_seed2 | lraspp | ✗ | mixture | 52.00 | 68.00 | 59.00 |" in text
    )  # each run too


def test_make_protocol2_trains_each_row_once_per_seed_and_tabulates_every_run():
    """`make protocol2 SEEDS="0 2"` (dry run): seed 0 in the row's folder, seed 2 beside it, and
    the table reads all eight runs."""
    import subprocess

    from conftest import REPO

    commands = subprocess.run(
        ["make", "-n", "protocol2", "SEEDS=0 2"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for row in ("real_seen", "synthetic", "with_real_seen", "real_all"):
        for seed, folder in ((0, f"shapes_{row}_lraspp"), (2, f"shapes_{row}_lraspp_seed2")):
            overlay = "" if row == "synthetic" else f"--config experiments/protocol2/shapes_{row}.yaml"
            fit = f"fit --config experiments/protocol2/shapes_segmenter.yaml {overlay}"
            assert (
                f"{fit} --seed_everything {seed} --trainer.default_root_dir outputs/protocol2/{folder} &&"
                in commands
            )
            assert f"outputs/protocol2/{folder}/zs3/report.json" in commands.split("--table 2")[1]
