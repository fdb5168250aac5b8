"""Backbones are real; the model shares one classifier; runs resume and checkpoints are atomic."""

from __future__ import annotations

import json

import pytest
import torch

from huse.runtime.errors import HuseError
from huse.train.backbones import create_backbone, list_backbones
from huse.train.model import HuseConfig, build_model


def test_efficientnet_lite0_weights_are_real_imagenet():
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from huse.runtime.preprocess import ImageSpec, load_image
    from huse.train.backbones import backbone_info

    info = backbone_info("efficientnet_lite0")
    spec = ImageSpec(size=(224, 224), mean=info.mean, std=info.std)
    x = torch.from_numpy(load_image(Image.fromarray(skimage_data.coffee()), spec))[None]
    model = create_backbone("efficientnet_lite0")
    with torch.no_grad():
        probs = model.imagenet_logits(x).softmax(-1)[0]
    assert int(probs.argmax()) == 967  # ImageNet class 967: espresso
    assert float(probs[967]) > 0.5


def test_registry_errors_list_the_known_names():
    with pytest.raises(HuseError, match=r"available backbones = \['efficientnet_lite0'"):
        create_backbone("resnet9000")
    with pytest.raises(HuseError, match="--backbone-weights"):
        create_backbone("vgg16")
    assert {"efficientnet_lite0", "mobilenet_v2", "vgg16", "tiny"} <= set(list_backbones())


def test_mobilenet_v2_loads_a_torchvision_layout_file_strictly(tmp_path):
    from safetensors.torch import save_file

    state = create_backbone("mobilenet_v2", pretrained=False).state_dict()
    state["classifier.1.weight"] = torch.zeros(1000, 1280)  # torchvision files carry the head; it is dropped
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "mnv2.safetensors"))
    model = create_backbone("mobilenet_v2", str(tmp_path / "mnv2.safetensors"))
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1280)
    save_file({"nothing": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(HuseError, match="does not fit"):
        create_backbone("mobilenet_v2", str(tmp_path / "bad.safetensors"))


def test_one_classifier_is_shared_by_both_modalities():
    cfg = HuseConfig(num_classes=4, backbone="tiny", vocab_size=20, embed_dim=16, hidden=16, max_len=6)
    model = build_model(cfg).eval()
    image, ids = torch.randn(3, 3, 32, 32), torch.randint(0, 20, (3, 6), dtype=torch.int32)
    ie, te = model.embed_image(image), model.embed_text(ids)
    torch.testing.assert_close(ie.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(te.norm(dim=1), torch.ones(3))
    classifiers = [m for m in model.modules() if type(m).__name__ == "SharedClassifier"]
    assert len(classifiers) == 1
    before_i, before_t = model.classifier(ie), model.classifier(te)
    with torch.no_grad():
        model.classifier.linear.bias += 1.0  # one change moves both modalities' logits
    torch.testing.assert_close(model.classifier(ie), before_i + model.classifier.log_scale.exp())
    torch.testing.assert_close(model.classifier(te), before_t + model.classifier.log_scale.exp())


def test_run_writes_metrics_and_resumes(tiny_catalog, tmp_path):
    from huse.train.data import load_catalog_dataset
    from huse.train.trainer import TrainConfig, Trainer

    ds = load_catalog_dataset(tiny_catalog)
    cfg = lambda: HuseConfig(num_classes=0, backbone="tiny", image_size=32, embed_dim=32, hidden=32, max_len=8)
    out = tmp_path / "run"
    Trainer(ds, out, cfg(), TrainConfig(epochs=1, batch_size=32, cv_folds=0)).fit(progress=False)
    assert json.loads((out / "state.json").read_text())["epoch"] == 1
    with pytest.raises(HuseError, match="--resume"):
        Trainer(ds, out, cfg(), TrainConfig(epochs=2, batch_size=32, cv_folds=0))
    metrics = Trainer(ds, out, cfg(), TrainConfig(epochs=2, batch_size=32, cv_folds=0), resume=True).fit(progress=False)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    for split in ("val", "test"):
        assert set(metrics[split]) == {"image", "text", "fused"}
        assert set(metrics[split]["fused"]["levels"]) == {"1", "2", "3"}
    assert 0.0 <= metrics["fusion_image_weight"] <= 1.0
    assert (out / "confusion_matrix.png").stat().st_size > 1000
    assert not list(out.rglob("*.tmp"))


def test_trained_model_beats_chance(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    # 4 balanced classes: chance is 25%; colour-coded images and titles make it easy.
    assert metrics["test"]["fused"]["top1"] > 0.6


def test_resume_without_checkpoint_is_a_clear_error(tiny_catalog, tmp_path):
    from huse.train.data import load_catalog_dataset
    from huse.train.trainer import TrainConfig, Trainer

    with pytest.raises(HuseError, match="no checkpoint"):
        Trainer(load_catalog_dataset(tiny_catalog), tmp_path / "new", HuseConfig(num_classes=0, backbone="tiny", image_size=32),
                TrainConfig(epochs=1), resume=True)


def test_interrupted_checkpoint_write_keeps_the_previous_one(tiny_catalog, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import huse.train.trainer as trainer_mod
    from huse.train.data import load_catalog_dataset
    from huse.train.trainer import TrainConfig, Trainer

    out = tmp_path / "run"
    ds = load_catalog_dataset(tiny_catalog)
    mk = lambda e, r=False: Trainer(ds, out, HuseConfig(num_classes=0, backbone="tiny", image_size=32, embed_dim=32, hidden=32,
                                                        max_len=8), TrainConfig(epochs=e, batch_size=32, cv_folds=0), resume=r)
    mk(1).fit(progress=False)
    before = load_file(str(out / "checkpoint.safetensors"))

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies while writing the next checkpoint

    monkeypatch.setattr(trainer_mod, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        mk(2, True).fit(progress=False)
    monkeypatch.undo()
    after = load_file(str(out / "checkpoint.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "state.json").read_text())["epoch"] == 1


@pytest.mark.parametrize("backbone, size", [("tiny", 32), ("efficientnet_lite0", 64)])
def test_cached_image_features_are_the_torch_backbones(tiny_catalog, backbone, size):
    # On the CPU the frozen features come from onnxruntime (for speed); training, export and the
    # runtime all assume they are the torch backbone's: float32 rounding only, across batch edges.
    import numpy as np

    from huse.runtime.preprocess import ImageSpec, load_image
    from huse.train.backbones import backbone_info
    from huse.train.data import load_catalog_dataset
    from huse.train.trainer import extract_image_features

    ds = load_catalog_dataset(tiny_catalog)
    info = backbone_info(backbone)
    spec = ImageSpec(size=(size, size), mean=info.mean, std=info.std)
    model = build_model(HuseConfig(num_classes=4, backbone=backbone, image_size=size, vocab_size=10))
    feats = extract_image_features(model, ds, spec, None, batch=7)  # 7: the last batch is a short one
    with torch.no_grad():
        ref = model.backbone(torch.from_numpy(np.stack([load_image(i, spec) for i in ds.images])))
    assert feats.shape == ref.shape == (len(ds.images), info.feature_dim)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-4)  # fp32 vs fp32: rounding only
