"""The visual space of a retrieval index (issue 10): built beside the universal one, searched by photo only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss", reason="the [index] extra (faiss-cpu) is not installed")

from huse.runtime import Classifier, HuseError, Index  # noqa: E402
from huse.runtime.bundle import load_manifest  # noqa: E402
from tests.models.make_bundles import make_pre_visual_bundle  # noqa: E402
from tests.models.make_data import split_catalog  # noqa: E402


@pytest.fixture(scope="module")
def old_bundle(tiny_bundle, tmp_path_factory):
    return make_pre_visual_bundle(tiny_bundle, tmp_path_factory.mktemp("old") / "bundle")


def _copy(src: Path, tmp_path: Path) -> Path:
    shutil.copytree(src, tmp_path / src.name)
    return tmp_path / src.name


def test_build_writes_a_visual_index_over_the_photo_rows(flat_index, tiny_bundle, records):
    idx = Index.open(flat_index)
    m = idx.manifest
    assert idx.has_visual and m["visual_dim"] == load_manifest(tiny_bundle)["visual_dim"] == 32
    assert set(m["modalities"]) == {"image", "text", "visual"}
    assert m["counts"]["visual"] == m["counts"]["image"] == len(records)
    assert {"visual.faiss", "visual.vectors.npy"} <= set(m["files"]) and m["modalities"]["visual"]["recall_at_10"] == 1.0
    vectors, centre = np.load(flat_index / "visual.vectors.npy"), np.load(flat_index / "visual.centre.npy")
    assert "visual.centre.npy" in m["files"]
    with Classifier(tiny_bundle) as clf:  # the indexed vectors: the photos' embed_visual centred on the catalog
        raw = clf.embed_visual([r.image for r in records]).vectors
    np.testing.assert_allclose(centre, raw.mean(0), atol=1e-6)
    np.testing.assert_allclose(vectors, (raw - centre) / np.linalg.norm(raw - centre, axis=1, keepdims=True), atol=1e-5)


def test_own_photo_is_its_nearest_visual_neighbour(flat_index, records):
    idx = Index.open(flat_index)
    sample = records[::7]
    for r, hits in zip(sample, idx.search(images=[r.image for r in sample], k=3, space="visual")):
        assert hits[0].row == r.row and hits[0].modality == "visual", (r, hits[0])
        assert hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[0].score >= hits[1].score >= hits[2].score
    products = idx.search(images=[sample[0].image], k=10, target="product", space="visual")[0]
    assert products[0].product_id == sample[0].product_id
    assert len({h.product_id for h in products}) == 10 and {h.modality for h in products} == {"visual"}
    hits = idx.search(images=[sample[0].image], k=5, space="visual", filter="bags")[0]
    assert len(hits) == 5 and all(h.classes.startswith("bags<") for h in hits)


def test_a_changed_copy_of_a_photo_finds_its_original(flat_index, records):
    """The duplicate use: a brightened, slightly noisier copy of a catalog photo finds that photo first."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sample = records[::9]
    copies = []
    for r in sample:
        x = np.asarray(Image.open(r.image), np.float32) + 6 + rng.normal(0, 2, (32, 32, 3))
        copies.append(np.clip(x, 0, 255).astype(np.uint8))
    hits = Index.open(flat_index).search(images=copies, k=1, space="visual")
    assert [h[0].row for h in hits] == [r.row for r in sample]


def test_search_vectors_takes_visual_vectors_of_the_visual_width(flat_index):
    idx = Index.open(flat_index)
    q = np.load(flat_index / "visual.vectors.npy")[[3, 11]]
    assert [h[0].item for h in idx.search_vectors(q, k=2, space="visual")] == [3, 11]
    with pytest.raises(HuseError, match=r"query vectors have dim 32; the index holds dim 64 in space 'universal'"):
        idx.search_vectors(q, k=2)
    with pytest.raises(HuseError, match=r"query vectors have dim 64; the index holds dim 32 in space 'visual'"):
        idx.search_vectors(np.load(flat_index / "image.vectors.npy")[[3]], k=2, space="visual")


def test_the_visual_space_refuses_what_it_cannot_answer(flat_index, records):
    idx = Index.open(flat_index)
    photo = records[0].image
    assert idx.search(images=[photo], k=1)[0][0].modality == "image"  # the default stays universal
    with pytest.raises(HuseError, match=r"searches by photo only .*Search those in space='universal'"):
        idx.search(texts=["Acme black tee"], space="visual")
    with pytest.raises(HuseError, match=r"searches by photo only .*fused query"):
        idx.search(images=[photo], texts=["Acme black tee"], space="visual")
    with pytest.raises(HuseError, match=r"not target 'text': titles have no visual vectors"):
        idx.search(images=[photo], target="text", space="visual")
    with pytest.raises(HuseError, match=r"space 'pixels' is not one of \['universal', 'visual'\]"):
        idx.search(images=[photo], space="pixels")


def test_an_index_of_an_old_bundle_searches_universally_and_refuses_the_visual_space(old_bundle, tiny_catalog, records,
                                                                                      tmp_path):
    idx = Index.build(old_bundle, tiny_catalog, tmp_path / "idx", kind="flat", progress=False)
    assert not idx.has_visual and set(idx.manifest["modalities"]) == {"image", "text"}
    assert "visual_dim" not in idx.manifest and not (tmp_path / "idx" / "visual.faiss").exists()
    assert idx.search(images=[records[4].image], k=1)[0][0].row == records[4].row
    with pytest.raises(HuseError, match=r"has no visual vectors.*Re-export the bundle.*rebuild the index"):
        idx.search(images=[records[4].image], space="visual")
    assert idx.add(tiny_catalog, progress=False, replace=True)["added"] == len(records)  # add and remove still work
    assert idx.remove([records[0].product_id])["removed"] == 1


def test_from_embeddings_without_visual_vectors_refuses_the_visual_space(tiny_bundle, records, tmp_path):
    with Classifier(tiny_bundle) as clf:
        img, vis = clf.embed_image_visual([r.image for r in records])
        txt = clf.embed_text([r.name for r in records])
    idx = Index.from_embeddings(tiny_bundle, records, {"image": img.vectors, "text": txt.vectors}, tmp_path / "a",
                                progress=False)
    with pytest.raises(HuseError, match=r"has no visual vectors"):
        idx.search(images=[records[0].image], space="visual")
    # an add embeds with the bundle, which has visual vectors: the index keeps its own modalities (a KeyError before)
    assert idx.add(records[:3], replace=True, progress=False)["replaced"] == 3
    assert set(idx.manifest["modalities"]) == {"image", "text"} and len(idx) == len(records) + 3
    # With them, a photo whose image or visual row failed is in neither index.
    image, visual = img.vectors.copy(), vis.vectors.copy()
    image[2], visual[5] = np.nan, np.nan
    idx = Index.from_embeddings(tiny_bundle, records, {"image": image, "text": txt.vectors, "visual": visual},
                                tmp_path / "b", progress=False)
    m = idx.manifest
    assert m["counts"]["image"] == m["counts"]["visual"] == len(records) - 2
    assert {(e["item"], e["modality"]) for e in idx.excluded()} == {(2, "image"), (5, "image")}
    assert np.isfinite(visual[2]).all() and np.isfinite(image[5]).all()  # the caller's arrays are left alone
    rows = {h.item for h in idx.search_vectors(vis.vectors[[2, 5, 7]], k=len(records), space="visual")[0]}
    assert 7 in rows and not rows & {2, 5}
    with pytest.raises(HuseError, match=r"embeddings must be .* 'visual': 32"):
        Index.from_embeddings(tiny_bundle, records, {"image": image, "text": txt.vectors, "visual": image},
                              tmp_path / "c", progress=False)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_add_and_remove_keep_the_visual_index_consistent(kind, tiny_bundle, tiny_catalog, records, tmp_path):
    first, rest, rows = split_catalog(tiny_catalog, tmp_path)
    idx = Index.build(tiny_bundle, first, tmp_path / "idx", images=tiny_catalog.parent, kind=kind, progress=False)
    assert idx.manifest["counts"]["visual"] == len(rows[::2])
    centre = np.load(tmp_path / "idx" / "visual.centre.npy")
    r = idx.add(rest, images=tiny_catalog.parent, progress=False)
    assert r["visual"] == r["image"] == len(rows[1::2])
    idx = Index.open(tmp_path / "idx")
    assert idx.manifest["counts"]["visual"] == idx.manifest["counts"]["image"] == len(rows)
    added = next(x for x in records if x.product_id == rows[1]["product_id"])
    assert idx.search(images=[added.image], k=1, space="visual")[0][0].product_id == added.product_id
    # added photos are centred on the first catalog's mean, kept from the build (never recomputed)
    assert np.array_equal(np.load(tmp_path / "idx" / "visual.centre.npy"), centre)
    with Classifier(tiny_bundle) as clf:
        raw = clf.embed_visual([added.image]).vectors[0] - centre
    row = next(i for i, it in enumerate(idx.items()) if it["product_id"] == added.product_id)
    np.testing.assert_allclose(np.load(tmp_path / "idx" / "visual.vectors.npy")[row], raw / np.linalg.norm(raw), atol=1e-5)

    gone = [rows[0]["product_id"], rows[1]["product_id"], rows[2]["product_id"]]
    assert idx.remove(gone)["removed"] == 3
    idx = Index.open(tmp_path / "idx")
    queries = [x.image for x in records if x.product_id in gone]
    for target in ("image", "product"):
        for hits in idx.search(images=queries, k=len(rows), target=target, space="visual"):
            assert not {h.product_id for h in hits} & set(gone), (kind, target)
            assert len(hits) == len(rows) - 3
    assert idx.manifest["counts"]["visual"] == idx.manifest["counts"]["image"] == len(rows) - 3
    if kind == "hnsw":
        assert idx.manifest["modalities"]["visual"]["tombstones"] == 3


@pytest.mark.parametrize("name", ["visual.faiss", "visual.vectors.npy"])
def test_a_tampered_visual_file_is_refused_naming_it(flat_index, records, tmp_path, name):
    idx_dir = _copy(flat_index, tmp_path)
    data = bytearray((idx_dir / name).read_bytes())
    data[-3] ^= 0x01
    (idx_dir / name).write_bytes(bytes(data))
    idx = Index.open(idx_dir)
    assert idx.search(images=[records[0].image], k=1)[0][0].row == records[0].row  # universal: never reads it
    with pytest.raises(HuseError, match=rf"file {name.replace('.', '[.]')} does not match its sha256"):
        idx.search(images=[records[0].image], k=3, space="visual")  # a flat search reads the .faiss...
        idx.search(images=[records[0].image], k=3, space="visual", filter="bags")  # ...a filtered one the vectors


def test_cli_search_space(flat_index, records, tmp_path):
    from click.testing import CliRunner

    from huse.runtime.cli import main

    cli = CliRunner()
    q = records[13]
    r = cli.invoke(main, ["search", str(flat_index), "--image", q.image, "--space", "visual", "-k", "3"])
    assert r.exit_code == 0, r.output
    first = r.output.splitlines()[1]
    assert f"{q.product_id} row {q.row} [visual]" in first, r.output
    batch = tmp_path / "q.csv"  # a batch file's titles are not visual queries: its photos are
    batch.write_text(f"image,name\n{q.image},Acme black tee\n")
    r = cli.invoke(main, ["search", str(flat_index), "--batch", str(batch), "--space", "visual", "-k", "1",
                          "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o.jsonl").read_text())["hits"][0]["row"] == q.row
    r = cli.invoke(main, ["search", str(flat_index), "--text", "Acme black tee", "--space", "visual"])
    assert r.exit_code == 1 and r.output.startswith("error: space='visual' searches by photo only"), r.output
    assert r.output.count("\n") == 1  # one line, no traceback
    r = cli.invoke(main, ["search", "--help"])
    assert "same product" in r.output and "products of this kind" in r.output
