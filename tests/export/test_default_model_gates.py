"""The default model (real EfficientNet-Lite0 + word CNN) on real fashion-products photos:
its FP16, INT8 and INT8-CPU bundles pass the accuracy gates, every TensorRT graph passes the
TensorRT check (the INT8-CPU graphs are not for TensorRT; huse-bench measures their speed).

A reduced recipe (5,000 train products, 6 epochs) keeps this to a couple of minutes; the full
recipe's figures come from `make demo` and are in the README.
"""

from __future__ import annotations

import pytest

from huse.train.fashion import DEFAULT_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEFAULT_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                       reason="dataset-fashion-mnist not installed (make data)"),
]


def test_fp16_and_int8_pass_the_gates(tmp_path):
    from huse.export.api import ExportOptions, export
    from huse.train.data import load_builtin
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    ds = load_builtin("fashion-products", train_size=5000, val_size=1000, test_size=1000)
    metrics = Trainer(ds, tmp_path / "run", HuseConfig(num_classes=0), TrainConfig(epochs=6)).fit(progress=False)
    assert metrics["test"]["fused"]["top1"] > max(metrics["test"]["image"]["top1"], metrics["test"]["text"]["top1"])
    m = export(tmp_path / "run", tmp_path / "bundle", ExportOptions(fp16=True, int8=True, int8_cpu=True, eval_size=1000,
                                                                     engine="skip", say=lambda s: None))
    assert set(m["models"]) == {"fp32", "fp16", "int8", "int8-cpu"}  # a failed gate would have raised
    for precision, size_bar in (("fp16", 0.55), ("int8", 0.30), ("int8-cpu", 0.70)):
        acc = m["accuracy"][precision]
        assert acc["passed"] and acc["modes"]["fused"]["passed"]
        assert acc["size_ratio_vs_fp32"] <= size_bar
    assert max(m["parity"]["max_abs_diff"].values()) <= 1e-4
    assert m["trt_compat"]["passed"] and len(m["trt_compat"]["checked"]) == 9

