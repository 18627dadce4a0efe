"""W&B: offline when no server is reachable; the logged metrics, tables and images read back."""

import socket

from conftest import scenes_args
from grounded_diffusion.cli import main
from grounded_diffusion.loggers import wandb_server_reachable
from wandb_records import history


def test_server_detection_needs_credentials_and_a_connection(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert not wandb_server_reachable()  # no API key
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        assert wandb_server_reachable()
        monkeypatch.setenv("WANDB_MODE", "offline")
        assert not wandb_server_reachable()
    monkeypatch.delenv("WANDB_MODE")
    assert not wandb_server_reachable(timeout=0.5)  # the server is gone


def test_offline_run_holds_metrics_tables_and_overlays(scene_cache):
    main(["fit", *scenes_args(scene_cache, steps=2), "--trainer.log_every_n_steps", "1"])
    main(["test", *scenes_args(scene_cache), "--ckpt_path", "last", "--verbose", "false"])
    # The run stays open in this process (the CLI's ends with it): finish it, so that its records are
    # written before they are read, however busy the machine (the W&B service writes them apart).
    import wandb

    wandb.finish()
    runs = sorted((scene_cache / "wandb").glob("offline-run-*"))
    fit_rows, test_rows = history(runs[-2]), history(runs[-1])

    logged = {k for row in fit_rows for k in row}
    assert {"val/seen_miou", "val/unseen_miou", "val/harmonic_miou", "train/loss"} <= logged
    table = next(row for row in fit_rows if "val/per_category/_type" in row)
    assert table["val/per_category/_type"] == "table-file" and table["val/per_category/nrows"] == 8
    assert table["val/overlays/count"] == 7 and len(table["val/overlays/all_masks"]) == 7  # the 7 val samples
    assert {"ground_truth", "predictions"} <= set(table["val/overlays/all_masks"][0])
    assert (runs[-2] / "files" / table["val/overlays/filenames"][0]).exists()

    test_logged = {k for row in test_rows for k in row}
    assert {"test/ours/one_seen/miou", "test/daam/two_unseen/image_noun_miou"} <= test_logged
    comparison = next(row for row in test_rows if "test/baseline_comparison/_type" in row)
    assert comparison["test/baseline_comparison/nrows"] == 6
    assert (runs[-1] / "files" / comparison["test/baseline_comparison/path"]).exists()

    # The same, on disk for offline readers.
    validation = sorted((scene_cache / "evaluation").glob("val-step*"))[-1]
    assert len(list(validation.glob("*.png"))) == 7 and "seen_miou" in (validation / "report.md").read_text()
    assert "two_seen_unseen" in (scene_cache / "evaluation" / "test.md").read_text()
