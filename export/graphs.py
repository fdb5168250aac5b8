"""The three bundle graphs as torch modules, their ONNX export, and the parity check.

image.onnx : image (N,3,H,W) float32           -> embedding (N,D), logits (N,C), visual (N,V)
text.onnx  : input_ids (N,L) int32 [+ attention_mask (N,L) int32 for MiniLM] -> embedding, logits
fused.onnx : image + text inputs                 -> probs (N,C), image_embedding, text_embedding

`visual` is the visual-similarity vector (issue 10): the frozen backbone's pooled features (F wide),
centred by the training-set mean the model already holds (FeatureNorm's buffer), L2-normalised,
then PCA-whitened to V = min(VISUAL_DIMS, F) dims with a projection fitted on training photos at
export (`VisualWhitening`) and L2-normalised again. The universal embedding is class-structured
(photos of one class crowd together); `visual` keeps what tells two products of one class apart,
so "this same product, from a photo" searches it (runtime/index.py).
Bundles exported before it have no `visual` output; the runtime asks for a re-export.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from huse.export.onnx_graph import producers_consumers, strip_unused_opsets
from huse.runtime.errors import HuseError
from huse.runtime.tokenizer import TOKEN_INPUTS
from huse.train.model import HUSE

OPSET = 17  # TensorRT 10 and 11 parse opset 17; Q/DQ needs >= 13


# Whitening the visual vector (PCA, each component scaled by 1 / sqrt(variance + mean variance): the
# shrinkage keeps the weakest components from amplifying noise), fitted on training photos. Same-product
# I->I R@1 through the lean runtime, test products unseen in training, against the centred features alone
# (= the frozen-backbone baseline): fashion-products 4-view set 0.534 vs 0.499 (in numpy: 0.523 at 128 dims,
# 0.536 at 512), phosphor-icons 0.874 vs 0.859; and the visual index is 7.75x smaller than at 1,984 dims.
VISUAL_DIMS = 256
VISUAL_FIT_PHOTOS = 2000


class VisualWhitening(nn.Module):
    """x (N, F) unit vectors -> normalise((x - mean) @ projection): PCA-whitening, baked into image.onnx."""

    def __init__(self, mean: torch.Tensor, projection: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("projection", projection)

    @classmethod
    def fit(cls, x: np.ndarray, dims: int = VISUAL_DIMS) -> "VisualWhitening":
        """Fit on (N, F) centred, L2-normalised backbone features of training photos."""
        x = np.asarray(x, np.float64)
        mean = x.mean(0)
        xc = x - mean
        # The principal axes as eigenvectors of the scatter matrix (F x F) rather than from the SVD of the
        # data: on 2,000 fashion-products photos x 1,984 features, 0.36x the CPU time, the same projection
        # to 1e-13 (up to each axis's sign, which cosines do not see).
        var, vec = np.linalg.eigh(xc.T @ xc)
        var, vec = var[::-1], vec[:, ::-1]  # largest first
        if len(x) < 2 or not var[0] > 0:  # one photo, or all alike: nothing to whiten
            return cls.identity(x.shape[1])
        d = min(dims, *x.shape)  # weak components are not amplified: the shrinkage bounds their scale
        var = np.clip(var[:d], 0, None)  # rank-deficient tails come out as -1e-17, not 0
        proj = vec[:, :d] / np.sqrt(var + var.mean())
        return cls(torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(proj.astype(np.float32)))

    @classmethod
    def identity(cls, dim: int) -> "VisualWhitening":
        """No whitening (for graphs whose visual output nobody reads, e.g. the PyTorch eager baseline)."""
        return cls(torch.zeros(dim), torch.eye(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize((x - self.mean) @ self.projection, dim=-1)


def centred_features(model: HUSE, feats: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features centred by the training-set mean, L2-normalised: the input of the
    whitening. Centred, not standardised: on the fashion-products demo run (4-view set) same-product R@1 was
    0.495 centred vs 0.430 standardised; dividing by the std gives the small early-stage features the weight
    of the last stage's ((x - mean) * inv_std**a gave 0.488 at a = 0.25, 0.481 at 0.5, 0.464 at 0.75)."""
    return F.normalize(feats - model.feature_norm.mean, dim=-1)


def fit_visual_whitening(model: HUSE, images: np.ndarray, batch: int = 256) -> VisualWhitening:
    """`VisualWhitening.fit` on the centred features of preprocessed training photos (N, 3, H, W), computed
    as training computes them (huse.train.backbone_features: onnxruntime on the CPU)."""
    from huse.train.trainer import backbone_features

    model.eval()
    with backbone_features(model.backbone, images.shape[2:]) as features, torch.no_grad():
        x = torch.cat([centred_features(model, features(images[s:s + batch])) for s in range(0, len(images), batch)])
    return VisualWhitening.fit(x.numpy())


class ImageGraph(nn.Module):
    def __init__(self, model: HUSE, whitening: VisualWhitening):
        super().__init__()
        self.model = model
        self.whitening = whitening

    def forward(self, image: torch.Tensor):
        feats = self.model.image_features(image)  # the backbone runs once for both vectors
        emb = self.model.embed_image_features(feats)
        return emb, self.model.classifier(emb), self.whitening(centred_features(self.model, feats))


class FoldedWordCNN(nn.Module):
    """The word CNN with its embedding folded into the convolution: the form export writes (issue 24).

    conv(embed(ids))[t] = b + sum_j W_j E[ids[t + j - p]] = sum_j T_j[ids[t + j - p]], with one table
    T_j = E W_j^T (vocabulary x channels) per kernel tap, computed once in float64, the bias added to T_0,
    and the convolution's zero padding as one extra row (zero, or the bias in T_0). The graph is k Gathers
    and Adds where it was Gather, Transpose and a Conv: onnxruntime spent the text graph's time on the
    Conv's layout changes and its 2/3 of the multiply-adds (64 x 24 positions x 192 x 128 per batch of
    64), and a lookup needs no arithmetic. The tables weigh k * channels / word_dim (6x with the
    defaults) the embedding's bytes; parity with the torch model (`module`, not this form) is
    checked on export like every graph.
    """

    def __init__(self, cnn: nn.Module, length: int):
        super().__init__()
        conv = cnn.conv
        if conv.stride != (1,) or conv.dilation != (1,) or conv.groups != 1 or conv.padding_mode != "zeros":
            raise HuseError(f"cannot fold the word CNN's embedding into {conv}: only plain zero-padded convolutions")
        emb, weight = cnn.embed.weight.detach().double(), conv.weight.detach().double()  # (V, D), (C, D, k)
        tables = torch.einsum("vd,cdj->jvc", emb, weight)
        tables = torch.cat([tables, tables.new_zeros(tables.shape[0], 1, tables.shape[2])], 1)  # the padding row
        if conv.bias is not None:  # every position reads one row of each table: the bias rides in the first
            tables[0] += conv.bias.detach().double()
        self.register_buffer("tables", tables.float())
        self.kernel, self.pad, self.pad_id = int(weight.shape[2]), int(conv.padding[0]), int(emb.shape[0])
        # Output positions, a constant of the graph (titles are always `length` ids): from the traced input
        # shape it would be computed at run time, with Shape/Gather/Slice ops the graph does not need.
        self.positions = int(length) + 2 * self.pad - self.kernel + 1
        self.dense = cnn.dense

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        ids = F.pad(input_ids, (self.pad, self.pad), value=self.pad_id)
        h = F.embedding(ids[:, :self.positions], self.tables[0])  # (N, positions, C)
        for j in range(1, self.kernel):
            h = h + F.embedding(ids[:, j:j + self.positions], self.tables[j])
        # relu(max) = max(relu) exactly (ReLU is monotonic): the ReLU runs on (N, C), not (N, positions, C).
        return F.relu(self.dense(F.relu(h.amax(dim=1))))


def _export_form(model: HUSE) -> HUSE:
    """The model as export writes it: the same weights, the word CNN folded (`FoldedWordCNN`), MiniLM computing
    only the real tokens (`MiniLM.without_padding`: its Linears, LayerNorms and GELUs skip the padding)."""
    if model.cfg.text_encoder == "cnn":
        text = FoldedWordCNN(model.text_encoder, model.cfg.max_len)
    elif model.cfg.text_encoder == "minilm":
        text = model.text_encoder.without_padding()
    else:
        return model
    form = copy.copy(model)  # shallow: shares every module and buffer, then swaps the text encoder
    form._modules = dict(model._modules, text_encoder=text)
    return form


class TextGraph(nn.Module):
    def __init__(self, model: HUSE):
        super().__init__()
        self.model = model
        self.uses_mask = model.cfg.text_encoder == "minilm"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        emb = self.model.embed_text(input_ids, attention_mask)
        return emb, self.model.classifier(emb)


class FusedGraph(nn.Module):
    def __init__(self, model: HUSE, image_weight: float):
        super().__init__()
        self.model = model
        self.image_weight = float(image_weight)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        ie = self.model.embed_image(image)
        te = self.model.embed_text(input_ids, attention_mask)
        probs = self.model.fuse(self.model.classifier(ie), self.model.classifier(te), self.image_weight)
        return probs, ie, te


def graph_specs(model: HUSE, image_weight: float,
                whitening: VisualWhitening | None = None) -> dict[str, dict[str, Any]]:
    """Per bundle graph: `module` (the torch model as trained: the PyTorch baseline, and the reference that
    parity is checked against), `export` (the equivalent form written to ONNX: `_export_form`), input names
    and output names. `whitening`: of the visual output; None: identity, for callers that do not read it."""
    text_inputs = ["input_ids", "attention_mask"] if model.cfg.text_encoder == "minilm" else ["input_ids"]
    whitening = whitening or VisualWhitening.identity(int(model.feature_norm.mean.numel()))
    form = _export_form(model)
    return {
        "image": {"module": ImageGraph(model, whitening), "export": ImageGraph(model, whitening), "inputs": ["image"],
                  "outputs": ["embedding", "logits", "visual"]},
        "text": {"module": TextGraph(model), "export": TextGraph(form), "inputs": text_inputs,
                 "outputs": ["embedding", "logits"]},
        "fused": {"module": FusedGraph(model, image_weight), "export": FusedGraph(form, image_weight),
                  "inputs": ["image"] + text_inputs, "outputs": ["probs", "image_embedding", "text_embedding"]},
    }


def export_onnx(module: nn.Module, example: dict[str, np.ndarray], inputs: list[str], outputs: list[str], path: Path,
                dynamic_length: bool = False) -> None:
    """Export one graph with a dynamic batch axis (the legacy exporter, opset 17, no external data).

    Args:
        dynamic_length: the token inputs' length axis (dim 1 of input_ids / attention_mask) is dynamic
            too: MiniLM's, whose batches are padded to their longest title (tokenizer spec "pad").
    """
    args = tuple(torch.from_numpy(example[n]) for n in inputs)
    dynamic = {n: {0: "batch", 1: "tokens"} if dynamic_length and n in TOKEN_INPUTS else {0: "batch"}
               for n in inputs + outputs}
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns that it is deprecated and about traced shape
        # arithmetic (our pads are constants by design); neither is actionable here.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic, do_constant_folding=True)


class _TorchRunner:
    """A Polygraphy runner over a torch module (Polygraphy's PytRunner is not usable on CPU)."""

    def __new__(cls, module: nn.Module, inputs: list[str], outputs: list[str], name: str, example: dict[str, np.ndarray]):
        from polygraphy.backend.base import BaseRunner

        class TorchRunner(BaseRunner):
            def __init__(self):
                super().__init__(name=name)

            def activate_impl(self):
                pass

            def deactivate_impl(self):
                pass

            def get_input_metadata_impl(self):
                from polygraphy.common import TensorMetadata

                # Polygraphy hands each runner only the inputs its metadata names.
                meta = TensorMetadata()
                for n in inputs:  # token inputs may be padded to any length (tokenizer spec "pad")
                    meta.add(n, example[n].dtype, (None, None) if n in TOKEN_INPUTS else (None,) + example[n].shape[1:])
                return meta

            def infer_impl(self, feed_dict):
                import time

                start = time.perf_counter()
                with torch.no_grad():
                    out = module(*(torch.from_numpy(feed_dict[n]) for n in inputs))
                self.inference_time = time.perf_counter() - start
                return {n: t.numpy() for n, t in zip(outputs, out)}

        return TorchRunner()


def check_parity(module: nn.Module, onnx_path: Path, feeds: list[dict[str, np.ndarray]], inputs: list[str],
                 outputs: list[str], atol: float) -> dict[str, dict[str, float]]:
    """Compare torch and onnxruntime on real inputs with Polygraphy's Comparator, output by output.

    Each output's limit is `atol` of its scale: its largest magnitude under torch on these inputs, at least 1.
    Unit-norm embeddings and probabilities are held to `atol` itself; logits, which the shared layer's learned
    scale takes to 10-30, to `atol` of their range. (Rounding grows with the values: an absolute 1e-4 refused
    default-recipe mdi-icons and fine-tuned phosphor-icons models whose embeddings matched torch within 3e-6 but
    whose logits, that embedding's dot products with the shared layer times a learned scale of ~11, differed by
    1.0-1.3e-4 at magnitudes of 11-14.)

    Args:
        module: the torch graph.
        onnx_path: its exported ONNX.
        feeds: real input batches.
        atol: the largest allowed difference on any output, as a fraction of its scale.
    Returns:
        {output name: {"max_abs_diff": the largest absolute difference seen, "limit": what it was held to}}.
    Raises:
        HuseError: when one exceeds its limit, naming the output, with the figures.
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    runners = [_TorchRunner(module, inputs, outputs, "torch", feeds[0]),
               OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]), name="onnxruntime")]
    results = Comparator.run(runners, data_loader=feeds)
    (_, torch_iters), (_, ort_iters) = results
    scale = {n: max(1.0, max(float(np.abs(t[n]).max()) for t in torch_iters)) for n in outputs}
    limits = {n: atol * scale[n] for n in outputs}
    ok = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=limits, rtol=0.0))
    diffs = {n: max(float(np.abs(np.asarray(t[n], np.float64) - np.asarray(o[n], np.float64)).max())
                    for t, o in zip(torch_iters, ort_iters)) for n in outputs}
    worst = max(outputs, key=lambda n: diffs[n] / limits[n])
    if not ok or diffs[worst] > limits[worst]:
        raise HuseError(f"{onnx_path.name}: onnxruntime differs from torch by up to {diffs[worst]:.3g} on output {worst!r} "
                        f"(limit {limits[worst]:.3g}: {atol:g} of its largest magnitude, {scale[worst]:.3g}) on real "
                        "test inputs; the export is refused")
    return {n: {"max_abs_diff": diffs[n], "limit": limits[n]} for n in outputs}


def optimize_onnx(path: Path) -> None:
    """Make an exported graph lean, in portable standard ONNX, before it is verified.

    onnxruntime's BASIC level folds constants and conv/batch-norm/add chains into plain ONNX ops
    (hardware independent, unlike the EXTENDED/ALL levels); then every zero Pad that feeds a
    Conv is folded into the Conv's own begin/end pads. TF-style "SAME" padding otherwise leaves
    Pads that onnxruntime's NCHWc layout cannot take, and each forces a layout round trip.
    Last, the opset imports the optimiser declares but no node uses are dropped.
    """
    import onnx
    import onnxruntime as ort

    tmp = path.with_name(path.stem + ".basic.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp)
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp))
    tmp.unlink()
    fold_pads_into_convs(model)
    strip_unused_opsets(model)
    onnx.save(model, str(path))


def fold_pads_into_convs(model) -> int:
    """Fold constant-zero spatial Pads into the single Conv they feed. Returns how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    _, consumers = producers_consumers(graph)
    outputs = {o.name for o in graph.output}
    folded = []
    for pad in graph.node:
        if pad.op_type != "Pad" or len(pad.input) < 2 or pad.input[1] not in inits or pad.output[0] in outputs:
            continue
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        value = pad.input[2] if len(pad.input) > 2 else ""
        if mode != "constant" or (value and (value not in inits or numpy_helper.to_array(inits[value]).any())):
            continue
        p = numpy_helper.to_array(inits[pad.input[1]])
        users = consumers.get(pad.output[0], [])
        if p.shape != (8,) or p[[0, 1, 4, 5]].any() or len(users) != 1 or users[0].op_type != "Conv":
            continue
        conv = users[0]
        attrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        old = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
        new = [old[0] + int(p[2]), old[1] + int(p[3]), old[2] + int(p[6]), old[3] + int(p[7])]
        if "pads" in attrs:
            conv.attribute.remove(attrs["pads"])
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return len(folded)
