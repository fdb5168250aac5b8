"""--image-size auto: the model's input follows the training photos' own size."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="needs the [train] extra (torch)")

from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from huse.runtime.errors import HuseError  # noqa: E402
from huse.train.data import Dataset  # noqa: E402
from huse.train.model import HuseConfig  # noqa: E402
from huse.train.trainer import choose_image_size  # noqa: E402


def _dataset(images) -> Dataset:
    n = len(images)
    return Dataset(list(images), ["t"] * n, ["a"] * n, [f"p{i}" for i in range(n)], ["train"] * n, {"source": "test"})


@pytest.mark.parametrize("side, want", [(28, 64), (96, 96), (100, 96), (150, 160), (300, 224)])
def test_auto_follows_the_photos_between_64_and_224(side, want):
    ds = _dataset([np.zeros((side, side + 20, 3), np.uint8) for _ in range(5)])
    cfg = HuseConfig(num_classes=0, image_size="auto")
    choice = choose_image_size(cfg, ds, np.arange(5), seed=0)
    assert cfg.image_size == want and choice == {"requested": "auto", "median_side": side, "photos": 5, "chosen": want}


def test_a_number_stays_and_files_are_read_from_their_headers(tmp_path):
    paths = []
    for i, side in enumerate((90, 100, 110)):
        Image.new("RGB", (side, 2 * side)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    cfg = HuseConfig(num_classes=0, image_size=128)
    assert choose_image_size(cfg, _dataset(paths), np.arange(3), 0)["chosen"] == 128 and cfg.image_size == 128
    cfg = HuseConfig(num_classes=0, image_size="auto")
    assert choose_image_size(cfg, _dataset(paths), np.arange(3), 0)["median_side"] == 100 and cfg.image_size == 96
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(HuseError, match="bad.png.*--image-size N"):
        choose_image_size(HuseConfig(num_classes=0, image_size="auto"), _dataset([str(tmp_path / "bad.png")]),
                          np.arange(1), 0)


def test_cli_auto_reaches_the_run_and_a_bad_size_is_one_line(tiny_catalog, tmp_path):
    import json

    from huse.train.cli import main

    r = CliRunner().invoke(main, ["--data", str(tiny_catalog), "--out", str(tmp_path / "x"), "--image-size", "big"])
    assert r.exit_code == 1 and "--image-size 'big' is not a size" in r.output and "Traceback" not in r.output
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["--data", str(tiny_catalog), "--out", str(out), "--backbone", "tiny", "--image-size", "auto",
                                  "--epochs", "1", "--batch-size", "32", "--embed-dim", "32", "--text-encoder", "cnn",
                                  "--cv-folds", "0"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["model"]["image_size"] == 64  # 32-px photos: the floor
    assert json.loads((out / "metrics.json").read_text())["image_size"]["median_side"] == 32
