"""Misuse of the Python API: each gives one clear HuseError (or a per-item error), never an
IndexError, AttributeError or a silent fallback."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from huse.runtime import Classifier, HuseError

IMAGE = np.full((32, 32, 3), 90, np.uint8)


@pytest.fixture(scope="module")
def clf(tiny_bundle):
    with Classifier(tiny_bundle, backend="onnxruntime") as c:
        yield c


@pytest.mark.parametrize("kw, what", [({"images": "photo.jpg"}, "images"), ({"titles": "Acme tee"}, "titles"),
                                      ({"images": b"\x89PNG"}, "images"), ({"images": Path("a.png")}, "images"),
                                      ({"titles": {"a": 1}}, "titles"), ({"images": 7}, "images")])
def test_a_lone_value_instead_of_a_list_is_refused(clf, kw, what):
    with pytest.raises(HuseError, match=rf"{what}= takes a list with one entry per item .* for one item pass \[{what[:-1]}\]"):
        clf.classify(**kw)


def test_lone_values_are_refused_by_the_embedding_calls_too(clf):
    with pytest.raises(HuseError, match="images= takes a list"):
        clf.embed_image("photo.jpg")
    with pytest.raises(HuseError, match="titles= takes a list"):
        clf.embed_text("Acme tee")


@pytest.mark.parametrize("top_k", [0, -1, 2.5, "3", True, None])
def test_top_k_must_be_a_positive_integer(clf, top_k):
    with pytest.raises(HuseError, match=rf"top_k must be a positive integer, got {top_k!r}"):
        clf.classify(titles=["Acme tee"], top_k=top_k)


def test_top_k_above_the_label_count_returns_every_label(clf):
    out = clf.classify(titles=["Acme tee"], top_k=np.int64(99))
    assert len(out[0]["top_k"]) == len(clf.labels)


@pytest.mark.parametrize("batch_size", [0, -5, 1.5, "64", None])
def test_batch_size_must_be_a_positive_integer(tiny_bundle, batch_size):
    with pytest.raises(HuseError, match=rf"batch_size must be a positive integer, got {batch_size!r}"):
        Classifier(tiny_bundle, backend="onnxruntime", batch_size=batch_size)


def test_cuda_without_a_usable_gpu_is_an_error_not_a_silent_cpu_run(tiny_bundle):
    from huse.runtime.backends.onnxrt.runner import cuda_provider_status

    if cuda_provider_status()[0]:
        pytest.skip("onnxruntime's CUDA provider works here: device='cuda' is honoured")
    for backend in ("auto", "onnxruntime"):
        with pytest.raises(HuseError, match=r"device='cuda' was asked for but no GPU backend is usable here \(.+\); "
                                            r"use device='cpu'"):
            Classifier(tiny_bundle, backend=backend, device="cuda")
    with pytest.raises(HuseError, match=r"device 'gpu' is not one of \[None, 'cpu', 'cuda'\]"):
        Classifier(tiny_bundle, device="gpu")


def test_missing_precision_hint_names_only_real_flags(tiny_bundle):
    with pytest.raises(HuseError, match=r"has no 'int8-cpu' models.*`huse-export .* --int8-cpu`"):
        Classifier(tiny_bundle, precision="int8-cpu")
    with pytest.raises(HuseError) as e:
        Classifier(tiny_bundle, precision="bf16")
    assert "--bf16" not in str(e.value) and "huse-export can add ['fp16', 'int8', 'int8-cpu']" in str(e.value)


def test_close_waits_for_calls_in_flight_and_the_object_stays_usable(tiny_bundle):
    """8 threads classify while another closes: every call returns a full answer, none crashes on
    a released session; after close a call loads the sessions again."""
    clf = Classifier(tiny_bundle, backend="onnxruntime", batch_size=2)
    expected = clf.classify(images=[IMAGE] * 6, titles=["Acme black tee"] * 6)
    results, errors = [], []
    start = threading.Barrier(9)

    def work():
        start.wait()
        for _ in range(5):
            try:
                results.append(clf.classify(images=[IMAGE] * 6, titles=["Acme black tee"] * 6))
            except HuseError as e:  # a call that starts during close() is refused, clearly
                errors.append(str(e))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    start.wait()
    for _ in range(3):
        clf.close()
    for t in threads:
        t.join()
    assert len(results) + len(errors) == 40
    assert all(r == expected for r in results)
    assert all("is being closed" in e for e in errors)
    assert clf.classify(titles=["Acme black tee"])[0]["top_k"]
    clf.close()
