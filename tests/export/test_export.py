"""huse-export on the tiny run: a self-describing bundle, parity refusal, precision gates."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from huse.runtime.bundle import load_manifest
from huse.runtime.errors import HuseError


def test_bundle_describes_itself(tiny_bundle):
    m = load_manifest(tiny_bundle)
    assert set(m["models"]["fp32"]) == {"image", "text", "fused"}
    assert m["labels"] == sorted(m["labels"]) and len(m["labels"]) == 4
    assert m["hierarchy"]["depth"] == 3 and m["embedding_dim"] == 64
    assert m["preprocessing"]["size"] == [32, 32] and m["tokenizer"]["type"] == "word"
    assert 0.0 <= m["fusion"]["image_weight"] <= 1.0
    assert {"torch", "onnx", "onnxruntime", "polygraphy"} <= set(m["versions"])
    assert set(m["files"]) == {"image.onnx", "text.onnx", "fused.onnx", "vocab.json"}
    for graph, diffs in m["parity"]["per_output"].items():  # the fp32 parity limits of the export
        assert all(diffs[o] <= m["parity"]["limits"][graph][o] for o in diffs), graph
    assert m["parity"]["limits"]["fused"]["probs"] == 1e-4  # probabilities: 1e-4 itself
    assert m["graphs"]["image"]["outputs"] == ["embedding", "logits", "visual"]
    assert m["visual_dim"] == 32 == m["visual"]["features"]  # the tiny backbone's width, under 256 whitened dims
    assert m["visual"]["fitted_on"].endswith("train photos")
    assert set(m["parity"]["per_output"]["image"]) == {"embedding", "logits", "visual"}
    assert m["parity"]["per_output"]["image"]["visual"] <= 1e-4
    assert m["trt_compat"]["passed"]


def test_graphs_have_a_dynamic_batch_axis(tiny_bundle):
    import onnx

    for g in ("image", "text", "fused"):
        model = onnx.load(str(tiny_bundle / f"{g}.onnx"))
        for i in model.graph.input:
            assert i.type.tensor_type.shape.dim[0].dim_param == "batch"


IMAGE_OUTPUTS = ["embedding", "logits", "visual"]


def _checked_image_graph(model, tmp_path, batch: int, seed: int):
    """`model`'s image graph exported on random inputs; (graph, feeds, check): check() is check_parity at 1e-4."""
    from huse.export.graphs import check_parity, export_onnx, graph_specs

    graph = graph_specs(model, 0.5)["image"]["module"]
    feeds = [{"image": np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)}]
    export_onnx(graph, feeds[0], ["image"], IMAGE_OUTPUTS, tmp_path / "image.onnx")
    return graph, feeds, lambda: check_parity(graph, tmp_path / "image.onnx", feeds, ["image"], IMAGE_OUTPUTS, atol=1e-4)


@pytest.mark.parametrize("multi", [False, True], ids=["single-label", "multi-label"])
def test_info_says_the_folds_tuned_what_the_bundle_ships(multi, tiny_catalog, tiny_multi_catalog, tmp_path):
    """Below 5,000 train + val rows a run tunes its temperatures (multi-label: thresholds) on its folds' pooled
    out-of-fold predictions and ships a model refitted on train + val; `huse info` said "on val" for those too."""
    from click.testing import CliRunner

    from huse.export.api import ExportOptions, export
    from huse.runtime.cli import main
    from huse.train.data import load_catalog_dataset
    from huse.train.model import HuseConfig
    from huse.train.trainer import TrainConfig, Trainer

    run, out = tmp_path / "run", tmp_path / "bundle"
    Trainer(load_catalog_dataset(tiny_multi_catalog if multi else tiny_catalog), run,
            HuseConfig(num_classes=0, backbone="tiny", image_size=32, embed_dim=32, hidden=32, max_len=8),
            TrainConfig(epochs=2, patience=0, batch_size=32, lr=3e-3, cv_folds=3)).fit(progress=False)
    export(run, out, ExportOptions(say=lambda s: None, engine="skip"))
    r = CliRunner().invoke(main, ["info", str(out)])
    assert r.exit_code == 0, r.output
    folds = "the out-of-fold predictions of 3 folds of train + val"
    line = "thresholds (tuned on " if multi else "calibration temperatures (fitted on "
    assert line + folds in r.output and "on val" not in r.output, r.output


def test_parity_check_refuses_a_graph_that_differs(tiny_run, tmp_path):
    from huse.train.trainer import load_run

    model, _ = load_run(tiny_run)
    image_graph, feeds, check = _checked_image_graph(model, tmp_path, batch=4, seed=0)
    parity = check()
    assert set(parity) == set(IMAGE_OUTPUTS)
    # unit-norm outputs are held to 1e-4 itself; logits to 1e-4 of their largest magnitude
    assert parity["embedding"]["limit"] == parity["visual"]["limit"] == 1e-4
    with torch.no_grad():
        largest = float(image_graph(torch.from_numpy(feeds[0]["image"]))[1].abs().max())
    assert parity["logits"]["limit"] == pytest.approx(1e-4 * max(1.0, largest))
    assert all(c["max_abs_diff"] <= c["limit"] for c in parity.values())
    with torch.no_grad():
        model.classifier.linear.bias += 1e-2  # the torch model moves; the ONNX file does not
    with pytest.raises(HuseError, match=r"differs from torch by up to .* on output 'logits' \(limit .*: 0.0001 of its "
                                        r"largest magnitude"):
        check()


def test_parity_holds_logits_to_their_scale_so_rounding_of_large_logits_passes(tiny_run, tmp_path):
    """Logits 1e6 times larger carry float32 rounding far above an absolute 1e-4 (one ulp at 1e6 is 0.06); the
    same graph, no error in it, passes because its limit is 1e-4 of the logits' magnitude. A wrong bias of 1% of
    that magnitude is still refused."""
    from huse.train.trainer import load_run

    model, _ = load_run(tiny_run)
    with torch.no_grad():
        model.classifier.linear.weight *= 1e6
        model.classifier.linear.bias *= 1e6
    _, _, check = _checked_image_graph(model, tmp_path, batch=8, seed=1)
    parity = check()
    assert parity["logits"]["max_abs_diff"] > 1e-4 and parity["logits"]["limit"] > 1e-2
    with torch.no_grad():
        model.classifier.linear.bias += 0.01 * parity["logits"]["limit"] / 1e-4
    with pytest.raises(HuseError, match="on output 'logits'"):
        check()


def test_visual_output_is_the_whitened_centred_backbone_features_of_torch(tiny_run, tiny_bundle, tiny_catalog):
    """The visual output, recomputed here from the model's parts: centred backbone features, L2-normalised,
    PCA-whitened as fitted on the export's training photos, L2-normalised (fp32, 1e-5)."""
    import torch.nn.functional as F

    from huse.export.api import EvalData
    from huse.export.graphs import VISUAL_FIT_PHOTOS
    from huse.runtime import Classifier
    from huse.runtime.catalog import read_catalog
    from huse.train.trainer import load_run

    model, cfg = load_run(tiny_run)
    model.eval()
    photos = [r.image for r in read_catalog(tiny_catalog)[::11]]
    with Classifier(tiny_bundle) as clf:
        x = clf.preprocess_images(photos)
        got = clf.embed_visual(photos).vectors
        assert np.array_equal(got, clf.run_graph("image", {"image": x})["visual"])
        train = EvalData(cfg["data"], "train", VISUAL_FIT_PHOTOS, clf.image_spec, clf.tokenizer, cfg["labels"]).images
    with torch.no_grad():
        def centred(images):
            return F.normalize(model.image_features(torch.from_numpy(images)) - model.feature_norm.mean, dim=-1).numpy()
        fit = centred(train).astype(np.float64)
        mean = fit.mean(0)
        _, s, vt = np.linalg.svd(fit - mean, full_matrices=False)
        proj = vt.T / np.sqrt(s ** 2 + (s ** 2).mean())
        want = (centred(x) - mean) @ proj
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    # A principal axis is defined up to its sign (the SVD here and the export's eigendecomposition may pick
    # either); cosines, which retrieval ranks by, do not see it. Each axis's sign is aligned, then compared.
    np.testing.assert_allclose(got * np.sign((got * want).sum(0)), want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_export_refuses_to_overwrite_without_force(tiny_run, tiny_bundle):
    from huse.export.api import ExportOptions, export

    with pytest.raises(HuseError, match="--force"):
        export(tiny_run, tiny_bundle, ExportOptions(say=lambda s: None))


def test_fp16_and_int8_variants_are_gated_and_recorded(tiny_bundle, tmp_path):
    from huse.export.api import ExportOptions, export
    from huse.runtime import Classifier

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    said = []
    m = export(bundle, None, ExportOptions(fp16=True, int8=True, calib_size=64, eval_size=0, engine="skip",
                                           accuracy_gate=False, say=said.append))
    assert set(m["models"]) == {"fp32", "fp16", "int8"}
    for p in ("fp16", "int8"):
        acc = m["accuracy"][p]
        assert set(acc["modes"]) == {"image", "text", "fused"} and acc["n"] > 0
        # The tiny model is mostly its word-embedding table, which stays float (a Gather, not
        # quantised); the 30% bar is for the default model and is measured by huse-export there.
        assert acc["size_ratio_vs_fp32"] < (0.55 if p == "fp16" else 0.45)
        assert any(f.startswith(f"{p}/") for f in m["files"])
    assert any("accuracy gate on" in s for s in said)
    with Classifier(bundle, backend="onnxruntime", precision="int8") as clf:
        out = clf.classify(titles=["Acme black tee"], mode="text")
        assert out[0]["mode"] == "text"
    # The visual output survives both conversions, and how far it moved is measured and recorded.
    for p in ("fp16", "int8"):
        v = m["accuracy"][p]["visual"]
        assert v["n"] == m["accuracy"][p]["n"] and 0 <= v["nn_agreement"] <= 100 and v["min_cosine"] <= v["mean_cosine"]
        assert any(s.startswith(f"  {p} visual: cosine to fp32") for s in said)
    assert m["accuracy"]["fp16"]["visual"]["min_cosine"] > 0.999  # FP16 weights barely move a unit vector
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    with Classifier(bundle, backend="onnxruntime") as ref:
        want = ref.embed_visual(images).vectors
    for p, atol in (("fp16", 1e-2), ("int8", 0.2)):  # the tolerances of each precision's unit vectors
        with Classifier(bundle, backend="onnxruntime", precision=p) as clf:
            got = clf.embed_visual(images).vectors
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
        np.testing.assert_allclose(got, want, atol=atol)


def test_int8_cpu_variant_is_gated_and_kept_away_from_tensorrt(tiny_bundle, tmp_path):
    from huse.export.api import ExportOptions, export
    from huse.runtime import Classifier

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    said = []
    m = export(bundle, None, ExportOptions(int8_cpu=True, calib_size=64, eval_size=0, engine="skip",
                                           accuracy_gate=False, say=said.append))
    assert set(m["models"]) == {"fp32", "int8-cpu"}
    conv = m["accuracy"]["int8-cpu"]["conversion"]
    assert conv["image"]["activations"] == "uint8, asymmetric" and conv["fused"]["attempts"]
    assert str(bundle) not in json.dumps(m)  # a bundle moves: its manifest names its files relative to itself
    assert any(s.startswith("  int8-cpu with the first 0 convs in float") for s in said)
    # The TensorRT check never sees its graphs (TensorRT does not take uint8 zero points).
    assert not any(f.startswith("int8-cpu/") for f in m["trt_compat"]["checked"])
    with Classifier(bundle, precision="int8-cpu") as clf:  # auto: the CPU, whatever GPU is present
        assert (clf.backend, clf.device) == ("onnxruntime", "cpu")
        assert clf.classify(titles=["Acme black tee"], mode="text")[0]["mode"] == "text"
    with pytest.raises(HuseError, match="'int8-cpu' graphs are for onnxruntime on CPUs"):
        Classifier(bundle, backend="tensorrt", precision="int8-cpu")
    from click.testing import CliRunner

    from huse.runtime.cli import main

    info = CliRunner().invoke(main, ["info", str(bundle)])
    fused = m["accuracy"]["int8-cpu"]["modes"]["fused"]
    assert info.exit_code == 0, info.output
    assert (f"int8-cpu: gate {'passed' if fused['passed'] else 'FAILED (overridden)'} on "
            f"{m['accuracy']['int8-cpu']['n']} test items; top-1 agreement with fp32: fused {fused['agreement']:.2f}%") in info.output
    visual = m["accuracy"]["int8-cpu"]["visual"]  # what an index built at int8-cpu finds by photo
    assert f"visual vectors: nearest other photo as fp32's for {visual['nn_agreement']:.2f}%" in info.output


@pytest.mark.parametrize("options, says", [
    ({"calib_size": 0}, r"--calib-size \(calib_size\) must be at least 1; got 0"),
    ({"eval_size": -1}, r"--eval-size \(eval_size\) must be at least 0; got -1"),
    ({"workspace_mib": 0}, r"--workspace-mib \(workspace_mib\) must be at least 1; got 0"),
    ({"batch": (8, 1, 64)}, r"--batch 8:1:64 is not a TensorRT profile; MIN:OPT:MAX needs 1 <= MIN <= OPT <= MAX")])
def test_export_settings_out_of_range_are_refused_before_any_work(options, says):
    from huse.export.api import ExportOptions

    with pytest.raises(HuseError, match=says):
        ExportOptions(**options)


def test_an_int8_exclude_name_in_no_graph_is_refused_not_ignored(tiny_bundle, tmp_path):
    from huse.export.api import ExportOptions, export

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    with pytest.raises(HuseError, match=r"--int8-exclude 'backbone/conv0' is not a node of the bundle's graphs; "
                                        r"names are exact, e\.g\. \["):
        export(bundle, None, ExportOptions(int8_cpu=True, int8_exclude=("backbone/conv0",), calib_size=64, eval_size=0,
                                           engine="skip", say=lambda s: None))
    assert "int8-cpu" not in json.loads((bundle / "manifest.json").read_text())["models"]


def test_force_replaces_a_bundle_and_never_another_folder(tiny_run, tiny_bundle, tmp_path):
    from huse.export.api import ExportOptions, export

    runs = tmp_path / "runs"  # `--out runs --force` for `--out runs/x --force`
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "model.safetensors").write_bytes(b"weeks of training")
    for src in (tiny_run, tiny_bundle):
        with pytest.raises(HuseError, match="is not a huse bundle, so --force will not delete it"):
            export(src, runs, ExportOptions(force=True, engine="skip", say=lambda s: None))
    assert (runs / "mine" / "model.safetensors").read_bytes() == b"weeks of training"
    assert not (tmp_path / "runs.partial").exists()


def test_failed_gate_stops_the_export_and_keeps_nothing(tiny_bundle, tmp_path, monkeypatch):
    import huse.export.precision as precision
    from huse.export.api import ExportOptions, export

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    real = precision.accuracy_gate

    def strict(ref, cand, labels, *, precision):
        report = real(ref, cand, labels, precision=precision)
        return {**report, "passed": False, "message": "agreement 97.00% < 99.90% (by 2.90 points)"}

    monkeypatch.setattr(precision, "accuracy_gate", strict)
    with pytest.raises(HuseError, match="fp16 accuracy gate failed .*by 2.90 points"):
        export(bundle, None, ExportOptions(fp16=True, eval_size=0, engine="skip", say=lambda s: None))
    assert not (bundle / "fp16").exists()
    assert "fp16" not in json.loads((bundle / "manifest.json").read_text())["models"]


def test_engine_require_fails_clearly_without_a_gpu(tiny_bundle, tmp_path):
    from huse.export.api import ExportOptions, export
    from huse.runtime.backends.trt.loader import engine_support

    if engine_support()[0]:
        pytest.skip("a GPU with TensorRT is present: the engine would be built")
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    with pytest.raises(HuseError, match="--engine require"):
        export(bundle, None, ExportOptions(engine="require", say=lambda s: None))


def test_tampered_bundle_is_refused(tiny_bundle, tmp_path):
    from huse.runtime import Classifier

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    data = bytearray((bundle / "text.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bundle / "text.onnx").write_bytes(bytes(data))
    with pytest.raises(HuseError, match="text.onnx does not match its sha256"):
        Classifier(bundle)


def test_visual_whitening_decorrelates_shrinks_and_degrades_to_identity():
    from huse.export.graphs import VisualWhitening

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)) * np.linspace(5, 0.1, 16)  # anisotropic: a few strong directions
    w = VisualWhitening.fit(x, dims=8)
    assert tuple(w.projection.shape) == (16, 8)
    p = (x - w.mean.numpy()) @ w.projection.numpy().astype(np.float64)
    g = p.T @ p  # = diag(var / (var + mean var)): decorrelated, every component below 1, strongest largest
    np.testing.assert_allclose(g - np.diag(np.diag(g)), 0, atol=1e-4)
    assert np.all((np.diag(g) > 0) & (np.diag(g) < 1)) and np.all(np.diff(np.diag(g)) < 0)
    out = w(torch.from_numpy(x[:5].astype(np.float32))).numpy()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    single = VisualWhitening.fit(x[:1])  # one photo: nothing to whiten
    assert torch.equal(single.projection, torch.eye(16)) and not single.mean.any()


def test_visual_whitening_is_pca_whitening_up_to_axis_signs():
    # The visual vector's cosines (what retrieval ranks by) are those of PCA-whitening by the SVD of the
    # centred photos, shrunk by the mean variance; the fit takes the eigenvectors of the scatter matrix instead.
    from huse.export.graphs import VisualWhitening

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 64)) * np.linspace(3, 0.1, 64)  # anisotropic, as backbone features are
    got = VisualWhitening.fit(x, dims=32)(torch.from_numpy(x).float()).numpy()
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ (vt[:32].T / np.sqrt(s[:32] ** 2 + np.mean(s[:32] ** 2)))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got @ got.T, ref @ ref.T, atol=1e-5)  # float32 graph vs float64 reference
