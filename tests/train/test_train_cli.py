"""huse-train and huse-export from the command line, on the tiny catalog."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner


def test_train_cli_fine_tune_and_class_distance_options(tiny_catalog, tmp_path):
    from huse.train.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["--data", str(tiny_catalog), "--out", str(out), "--backbone", "tiny", "--image-size", "32",
                                  "--fine-tune", "--epochs", "1", "--batch-size", "32", "--embed-dim", "32",
                                  "--weight-decay", "0.3", "--cv-folds", "0"])
    assert r.exit_code == 0, r.output
    assert "split by product" in r.output and "fused" in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["freeze_backbone"] is False and cfg["train"]["epochs"] == 1
    assert cfg["train"]["weight_decay"] == 0.3
    assert not (out / "cache").exists()  # fine-tuning runs the backbone on every batch: nothing cached


def test_train_cli_errors_are_one_line(tmp_path):
    from huse.train.cli import main

    r = CliRunner().invoke(main, ["--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and r.output.strip() == "error: pass --data CATALOG (repeatable) or --dataset NAME, not both"
    r = CliRunner().invoke(main, ["--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("flag, value, says", [
    ("--batch-size", "0", "--batch-size (batch_size) must be at least 1; got 0"),
    ("--lr", "-1", "--lr (lr) must be more than 0; got -1"),
    ("--embed-dim", "0", "--embed-dim (embed_dim) must be at least 1; got 0"),
    ("--image-size", "8", "--image-size (image_size) must be at least 32; got 8"),
    ("--epochs", "0", "--epochs (epochs) must be at least 1; got 0"),
    ("--alpha", "-0.5", "--alpha (alpha) must be at least 0; got -0.5"),
    ("--margin", "0", "--margin (margin) must be more than 0; got 0")])
def test_settings_out_of_range_are_refused_before_the_catalog_is_read(tmp_path, flag, value, says):
    from huse.train.cli import main

    r = CliRunner().invoke(main, ["--data", str(tmp_path / "never-read.csv"), "--out", str(tmp_path / "x"), flag, value])
    assert r.exit_code == 1 and r.output.strip() == f"error: {says}", r.output  # not "does not exist": checked first
    assert not (tmp_path / "x").exists()


def test_train_never_writes_its_files_into_a_folder_of_other_files(tiny_catalog, tmp_path):
    from huse.train.cli import main

    mine = tmp_path / "project"  # `--out project` for `--out project/runs/x`
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')  # a name a run writes too
    (mine / "notes.md").write_text("notes")
    r = CliRunner().invoke(main, ["--data", str(tiny_catalog), "--out", str(mine), "--backbone", "tiny",
                                  "--image-size", "32", "--epochs", "1"])
    assert r.exit_code == 1 and "holds files a training run does not write (notes.md)" in r.output, r.output
    assert (mine / "config.json").read_text() == '{"mine": true}' and sorted(p.name for p in mine.iterdir()) == [
        "config.json", "notes.md"]


def test_a_plain_rerun_starts_over_where_a_kill_left_half_written_files(tiny_catalog, tmp_path):
    from huse.train.cli import main

    out = tmp_path / "run"  # killed before its first checkpoint, in the middle of writing one
    out.mkdir()
    for name in ("optimizer.safetensors.next.tmp", "checkpoint.safetensors.next", "state.json.tmp"):
        (out / name).write_bytes(b"half")
    r = CliRunner().invoke(main, ["--data", str(tiny_catalog), "--out", str(out), "--backbone", "tiny",
                                  "--image-size", "32", "--epochs", "1", "--text-encoder", "cnn"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "state.json").read_text())["epoch"] == 1


def test_data_export_refuses_a_limit_of_nothing(tmp_path):
    from huse.train.cli import data

    for limit in ("0", "-3"):  # an empty catalog.csv, written over the last export without a word
        r = CliRunner().invoke(data, ["export", "fashion-products", str(tmp_path / "fp"), "--limit", limit])
        assert r.exit_code == 2 and "Invalid value for '--limit'" in r.output, r.output
    assert not (tmp_path / "fp").exists()


def test_data_export_never_writes_over_another_catalog(tmp_path):
    from huse.train.cli import data

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "catalog.csv").write_text("image,name\nphotos/kettle.jpg,Steel kettle\n")
    r = CliRunner().invoke(data, ["export", "fashion-products", str(mine), "--limit", "2"])
    assert r.exit_code == 1 and "exists and is not a built-in dataset's export" in r.output, r.output
    assert (mine / "catalog.csv").read_text() == "image,name\nphotos/kettle.jpg,Steel kettle\n"
    for _ in range(2):  # its own export is replaced by the next
        r = CliRunner().invoke(data, ["export", "fashion-products", str(tmp_path / "fp"), "--limit", "2"])
        assert r.exit_code == 0, r.output
    assert len((tmp_path / "fp" / "catalog.csv").read_text().splitlines()) == 1 + 3 * 2  # train, val, test


def test_every_command_has_help():
    from huse.benchmarks.cli import main as bench
    from huse.export.cli import main as export
    from huse.runtime.cli import main as huse
    from huse.train.cli import main as train

    for cmd, args in ((huse, []), (huse, ["classify"]), (huse, ["info"]), (huse, ["data", "export"]), (huse, ["doctor"]),
                      (huse, ["train"]), (huse, ["export"]), (huse, ["bench"]), (train, []), (export, []), (bench, ["run"]),
                      (bench, ["compare"]), (bench, ["serve"]), (huse, ["index", "build"]), (huse, ["index", "add"]),
                      (huse, ["serve"]), (huse, ["search"])):
        r = CliRunner().invoke(cmd, [*args, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, (args, r.output)
        # a flag's default reads as if the flag were on or off ("--no-photos ... [default: True]")
        assert "[default: True]" not in r.output and "[default: False]" not in r.output, (args, r.output)


def test_train_help_shows_the_configs_defaults():
    """Each default is read from the configs, and the help shows its value (it printed 'TrainConfig.patience')."""
    from huse.train.cli import main
    from huse.train.config import HuseConfig, TrainConfig

    r = CliRunner().invoke(main, ["--help"], terminal_width=400)
    assert r.exit_code == 0 and "Config." not in r.output, r.output
    entries = {"-" + e.split()[0]: " ".join(e.split()) for e in r.output.split("\n  -")[1:]}  # option: its help, one line
    for option, value in (("--patience", TrainConfig.patience), ("--weight-decay", TrainConfig.weight_decay),
                          ("--delta", TrainConfig.delta), ("--final-fit", TrainConfig.final_fit),
                          ("--image-views", TrainConfig.image_views), ("--multi-label-loss", HuseConfig.label_loss),
                          ("--cv-folds", "auto")):
        assert f"[default: {value}]" in entries[option], entries[option]


def test_train_on_cuda_without_a_gpu_says_why(tiny_catalog, tmp_path):
    from huse.train.cli import main
    from huse.train.trainer import cuda_status

    ok, why = cuda_status()
    if ok:
        pytest.skip(f"a GPU is usable here ({why})")
    r = CliRunner().invoke(main, ["--data", str(tiny_catalog), "--out", str(tmp_path / "run"), "--backbone", "tiny",
                                  "--device", "cuda", "--epochs", "1"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"--device cuda: {why}; train with --device cpu" in r.output


@pytest.mark.gpu
def test_fine_tuning_on_cuda_gives_a_run_the_cpu_loads(tiny_catalog, tmp_path):
    """A GPU-trained run is an ordinary run: export and the CPU load it, and it predicts as it did on the GPU."""
    import numpy as np
    import torch

    from huse.train.cli import main
    from huse.train.trainer import cuda_status, load_run

    ok, why = cuda_status()
    if not ok:
        pytest.skip(why)
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["--data", str(tiny_catalog), "--out", str(out), "--backbone", "tiny", "--image-size", "32",
                                  "--fine-tune", "--device", "cuda", "--epochs", "2", "--batch-size", "32", "--embed-dim", "32"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["train"]["device"] == "cuda"
    model, _ = load_run(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        cpu = model.embed_image(x).numpy()
        gpu = model.to("cuda").embed_image(x.to("cuda")).cpu().numpy()
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


def test_train_cli_multi_label_loss_reaches_the_run(tiny_multi_catalog, tmp_path):
    """--multi-label-loss bce trains the former recipe and says so in config.json; an unknown loss is refused."""
    from huse.train.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["--data", str(tiny_multi_catalog), "--out", str(out), "--backbone", "tiny",
                                  "--image-size", "32", "--epochs", "1", "--batch-size", "32", "--embed-dim", "32",
                                  "--multi-label-loss", "bce", "--cv-folds", "0"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["model"]["label_loss"] == "bce"
    r = CliRunner().invoke(main, ["--data", str(tiny_multi_catalog), "--out", str(tmp_path / "x"), "--multi-label-loss", "focal"])
    assert r.exit_code == 2 and "'focal' is not one of 'asl', 'bce'" in r.output


def test_ctrl_c_keeps_the_checkpoint_and_says_how_to_go_on(tiny_catalog, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "huse.train.cli", "--data", str(tiny_catalog), "--out", str(out), "--backbone",
            "tiny", "--image-size", "32", "--epochs", "100000", "--batch-size", "8", "--embed-dim", "32",
            "--cv-folds", "0"]
    # SIGINT's default action in the child even when this runner ignores it (`nohup ... &`): test_bulk.py says why
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "state.json").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Aborted" not in err, err
    assert "interrupted: the last checkpoint is kept; run the same command with --resume" in err


def test_train_on_a_catalog_and_its_review_corrections(tiny_catalog, tmp_path):
    """`--data` twice: the run records both catalogs (huse-export reloads them for its checks)."""
    import csv

    from huse.train.cli import main
    from tests.models.make_data import write_rows

    rows = list(csv.DictReader(open(tiny_catalog, newline="")))
    corrections = tmp_path / "corrections.csv"  # as `huse review export` writes them: paths as the catalog names them
    write_rows(corrections, [dict(r, product_id=f"fix-{r['product_id']}") for r in rows[:12]])
    r = CliRunner().invoke(main, ["--data", str(tiny_catalog), "--data", str(corrections), "--images",
                                  str(tiny_catalog.parent), "--out", str(tmp_path / "run"), "--backbone", "tiny",
                                  "--image-size", "32", "--epochs", "1", "--text-encoder", "cnn"])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert data["catalogs"] == [str(tiny_catalog.resolve()), str(corrections.resolve())]
    # the corrections are photos of the catalog itself: they replace its rows, not add to them
    assert sum(json.loads((tmp_path / "run" / "metrics.json").read_text())["split_sizes"].values()) == len(rows)
    assert "12 row(s) of a later --data catalog give new classes to a photo an earlier one holds" in r.output


def test_training_progress_is_written_at_its_interval_not_every_epoch(tiny_catalog, tmp_path):
    """A log file (stderr not a terminal) gets the training bar about every 2 s (tqdm's mininterval), not once per
    epoch: a small catalog's epoch is one step, and forcing a refresh with each epoch's figures wrote every step."""
    import time

    from huse.train.cli import main

    start = time.monotonic()
    r = CliRunner().invoke(main, ["--data", str(tiny_catalog), "--out", str(tmp_path / "run"), "--backbone", "tiny",
                                  "--image-size", "32", "--epochs", "40", "--batch-size", "512", "--embed-dim", "32",
                                  "--cv-folds", "0"])
    elapsed = time.monotonic() - start
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["train"]["epochs"] == 40  # 40 epochs of one step each
    updates = r.stderr.count("training:")
    assert 1 <= updates <= 3 + elapsed / 2, (updates, elapsed)
