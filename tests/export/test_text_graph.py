"""The word-CNN text graph as export writes it: the embedding folded into the convolution (issue 24)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from huse.export.graphs import FoldedWordCNN
from huse.runtime.errors import HuseError
from huse.train.model import HuseConfig, WordCNN


@pytest.mark.parametrize("kernel", [1, 2, 3, 5])
def test_folded_word_cnn_equals_the_trained_one(kernel):
    torch.manual_seed(kernel)
    cnn = WordCNN(HuseConfig(num_classes=3, vocab_size=50, max_len=9, word_dim=8, conv_channels=16,
                             conv_kernel=kernel, text_feature_dim=12)).eval()
    with torch.no_grad():
        cnn.embed.weight[0] = 0.3  # the padding id's row need not be zero: the conv's own padding still is
    ids = torch.from_numpy(np.random.default_rng(kernel).integers(0, 50, (7, 9)).astype(np.int32))
    ids[:, -3:] = 0
    ids[0] = 49
    with torch.no_grad():
        want, got = cnn(ids.long()), FoldedWordCNN(cnn, 9)(ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # fp32, tables summed in float64


def test_exported_text_graph_has_no_conv_and_matches_torch(tiny_run, tiny_bundle):
    import onnx

    from huse.export.graphs import graph_specs
    from huse.runtime import Classifier
    from huse.train.trainer import load_run

    ops = [n.op_type for n in onnx.load(str(tiny_bundle / "text.onnx")).graph.node]
    assert "Conv" not in ops and "Transpose" not in ops and ops.count("Gather") == 3  # one per kernel tap
    assert "Conv" not in [n.op_type for n in onnx.load(str(tiny_bundle / "fused.onnx")).graph.node
                          if n.input and "input_ids" in str(n.input)]
    model, _ = load_run(tiny_run)
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (11, model.cfg.max_len)).astype(np.int32)
    with torch.no_grad():
        emb, logits = graph_specs(model, 0.5)["text"]["module"](torch.from_numpy(ids))
    with Classifier(tiny_bundle, backend="onnxruntime") as clf:
        out = clf.run_graph("text", {"input_ids": ids})
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=0, atol=1e-4)  # the export's parity limit
    np.testing.assert_allclose(out["embedding"], emb.numpy(), rtol=0, atol=1e-4)


def test_word_cnn_text_session_runs_on_one_thread_and_the_image_graph_on_what_was_asked(tiny_bundle):
    from huse.runtime import Classifier

    with Classifier(tiny_bundle, backend="onnxruntime", threads=2) as clf:
        text = clf._runner("text").session.get_session_options()
        image = clf._runner("image").session.get_session_options()
    assert text.intra_op_num_threads == 1
    assert image.intra_op_num_threads == 2


def test_only_the_word_cnn_text_graph_is_pinned_to_one_thread():
    from huse.runtime.backends.onnxrt.runner import graph_threads

    assert graph_threads("text", "cnn", None) == 1
    assert graph_threads("text", "cnn", 4) == 1
    assert graph_threads("text", "minilm", None) is None  # MiniLM has the arithmetic to share
    assert graph_threads("text", "minilm", 3) == 3
    assert graph_threads("fused", "cnn", 2) == 2 and graph_threads("image", "cnn", None) is None


def test_word_cnn_text_batches_are_cut_by_rows_across_cores_with_the_same_results(tiny_bundle):
    # A batch of the one-thread text graph is cut into parts run at the same time (one per core asked
    # for); rows are independent, so the outputs must be those of the whole batch, row for row, and a
    # batch too small to cut runs whole.
    from huse.runtime import Classifier
    from huse.runtime.backends.onnxrt.runner import MIN_ROWS_PER_PART, OnnxrtRunner, graph_row_parts

    assert graph_row_parts("text", "cnn", 3) == 3 and graph_row_parts("text", None, 2) == 2
    assert graph_row_parts("text", "minilm", 2) == 1 and graph_row_parts("fused", "cnn", 2) == 1
    assert graph_row_parts("image", "cnn", None) == 1
    rows = 3 * MIN_ROWS_PER_PART + 5
    with Classifier(tiny_bundle, backend="onnxruntime", threads=3) as clf:
        runner = clf._runner("text")
        assert runner.row_parts == 3 and runner._pool is not None
        tok = clf.tokenizer
        ids = np.random.default_rng(1).integers(0, len(tok.vocab) + 2, (rows, tok.max_len)).astype(np.int32)
        got = clf.run_graph("text", {"input_ids": ids})
        small = clf.run_graph("text", {"input_ids": ids[:MIN_ROWS_PER_PART + 1]})  # one part: not cut
    with OnnxrtRunner(tiny_bundle / "text.onnx", threads=1) as whole:
        want = whole.infer({"input_ids": ids})
    assert runner._pool is None  # closing the Classifier stopped the pool's threads
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
        np.testing.assert_array_equal(small[name], want[name][:MIN_ROWS_PER_PART + 1])


def test_a_caller_that_keeps_the_cores_busy_asks_for_whole_text_batches(tiny_bundle, tiny_catalog, tmp_path):
    """Classifier(row_parts=1) runs word-CNN text batches whole (bulk work: its prepare pool has the other cores),
    caps the parts otherwise, and leaves the other graphs as they are; huse classify asks for it."""
    from huse.runtime import Classifier
    from huse.runtime.bulk import BulkJob, _make_classifier

    with Classifier(tiny_bundle, backend="onnxruntime", threads=3, row_parts=1) as clf:
        assert clf._runner("text").row_parts == 1 and clf._runner("text")._pool is None
        assert clf._runner("image").row_parts == 1 and clf._runner("image").threads == 3
    with Classifier(tiny_bundle, backend="onnxruntime", threads=3, row_parts=2) as clf:
        assert clf._runner("text").row_parts == 2
    with Classifier(tiny_bundle, backend="onnxruntime", threads=3, row_parts=5) as clf:
        assert clf._runner("text").row_parts == 3, "never more parts than threads"
    with pytest.raises(HuseError, match="row_parts must be a positive integer"):
        Classifier(tiny_bundle, backend="onnxruntime", row_parts=0)
    clf = _make_classifier(BulkJob(bundle=str(tiny_bundle), data=str(tiny_catalog), out=str(tmp_path / "o")), None)
    with clf:
        assert clf.row_parts == 1 and clf._runner("text").row_parts == 1
