"""Training HUSE: cached frozen features, three losses, atomic checkpoints, metrics.

A run directory holds everything export needs:
    config.json        model + training config, labels, data source, preprocessing, tokenizer, fusion
    vocab.json         the word tokenizer's vocabulary (or tokenizer.json for MiniLM)
    model.safetensors  every weight, backbone included (written at the end)
    checkpoint.safetensors, optimizer.safetensors, state.json   for --resume (atomic)
    metrics.json, confusion_matrix.png
    cache/             frozen backbone / MiniLM features, reused by --resume
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from huse.runtime.bundle import package_versions
from huse.runtime.files import sha256_file, write_atomic, write_json_atomic
from huse.runtime.classifier import temperature_scale
from huse.runtime.errors import HuseError
from huse.runtime.hierarchy import Hierarchy
from huse.runtime.labels import PATH_SEPARATOR, is_multi_label
from huse.runtime.preprocess import ImageSpec, load_image
from huse.runtime.tokenizer import WordTokenizer, normalise_title, words
from huse.train.backbones import backbone_info
from huse.train.baselines import (CV_FOLDS, MODES, best_weight, calibration_report, fit_temperature, fold_count,
                                  logistic_baselines, nll, product_folds)
from huse.train.data import Dataset
from huse.train.losses import huse_loss
import huse.train.multilabel as multilabel
from huse.train.config import FINAL_FITS, KFOLD_MAX_ROWS, HuseConfig, TrainConfig, resolve_arch
from huse.train.model import HUSE, build_model, class_name_loss, class_name_title, init_classifier_from_names


# What a run directory holds (the module docstring), its "cv" folds' runs included.
RUN_ENTRIES = frozenset({"config.json", "vocab.json", "tokenizer.json", "model.safetensors", "best.safetensors",
                         "checkpoint.safetensors", "optimizer.safetensors", "state.json", "metrics.json",
                         "confusion_matrix.png", "cache", "cv"})


def _run_entry(name: str) -> str:
    """The run file `name` is or is on its way to be: a killed run leaves X.next (a staged checkpoint
    file) and X.tmp / X.next.tmp (a write cut short, runtime/files.py's `write_atomic`)."""
    for suffix in (".tmp", ".next"):
        name = name.removesuffix(suffix)
    return name


# ----------------------------------------------------------------------------------------
# Small utilities


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write safetensors so that a killed run never leaves a broken file (huse.runtime.files.write_atomic)."""
    write_atomic(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def cuda_status() -> tuple[bool, str]:
    """Whether torch can use a GPU here (a CUDA build of torch and a GPU), and why not."""
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"
    return True, f"torch on {torch.cuda.get_device_name(0)}"


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise HuseError(f"device {name!r} not found; available devices = ['cpu', 'cuda']")
    if name == "cuda":
        ok, why = cuda_status()
        if not ok:
            raise HuseError(f"--device cuda: {why}; train with --device cpu, or install a CUDA build of torch")
    return torch.device(name)


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), **package_versions("huse-edge", "torch", "numpy", "pillow")}


def class_distances(hierarchy: Hierarchy, kind: str) -> np.ndarray:
    """A_ij for the semantic-graph loss: from the hierarchy, or MiniLM embeddings of class names."""
    if kind == "hierarchy":
        return hierarchy.distance_matrix()
    if kind == "minilm":
        from huse.train.minilm import embed_texts

        names = [" ".join(reversed(p)) for p in hierarchy.paths]  # "t-shirts tops clothing"
        e = embed_texts(names)
        return np.clip(1.0 - e @ e.T, 0.0, 2.0).astype(np.float32)
    raise HuseError(f"class distance {kind!r} not found; available = ['hierarchy', 'minilm']")


# A val title with more than this share of words unseen in training means new products bring new
# words: a word CNN trained from scratch maps them all to one out-of-vocabulary id, a pretrained
# encoder still reads them. Measured on val: closed-vocabulary fashion-products 0.7% (numbers in
# titles); fashion-products-open 49%; phosphor-icons (real names) 41% (README, "Model quality").
OPEN_VOCABULARY_RATE = 0.10


def unseen_word_rate(train_titles: list[str], titles: list[str]) -> float:
    """Share of the word tokens of `titles` that never occur in `train_titles`."""
    seen = {w for t in train_titles for w in words(t)}
    tokens = [w for t in titles for w in words(t)]
    return sum(w not in seen for w in tokens) / max(1, len(tokens))


def choose_text_encoder(cfg: HuseConfig, ds: Dataset, split: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Resolve text_encoder="auto" in place: MiniLM when val titles are open-vocabulary, else the word CNN."""
    rate = unseen_word_rate([ds.titles[i] for i in split["train"].tolist()], [ds.titles[i] for i in split["val"].tolist()])
    choice = {"requested": cfg.text_encoder, "val_unseen_word_rate": round(rate, 4), "threshold": OPEN_VOCABULARY_RATE}
    if cfg.text_encoder == "auto":
        cfg.text_encoder = "minilm" if rate > OPEN_VOCABULARY_RATE else "cnn"
    choice["chosen"] = cfg.text_encoder
    return choice


# --image-size auto: the model's input follows the photos' own size (the median shorter side of up to
# SIZE_SAMPLE training photos, to a multiple of 32), between IMAGE_SIZES' ends. 64 px keeps EfficientNet-Lite0's
# last stages above 1x1 for 28x28 Fashion-MNIST photos (fashion-products stays at 64); icons rasterised at 96 px
# take 96 (docs/quality.md, "Input size": 64 measured against 96); 224 is the backbone's ImageNet size and the cap.
IMAGE_SIZES = (64, 224)
SIZE_SAMPLE = 200


def _photo_side(image: Any) -> int:
    """The shorter side of a photo (an array's shape, or an image file's header: nothing is decoded)."""
    if isinstance(image, np.ndarray):
        return int(min(image.shape[:2]))
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
            return int(min(im.size))
    except (OSError, ValueError) as e:
        raise HuseError(f"--image-size auto: cannot read the size of {image}: {e}; fix or drop that row, or pass "
                        "--image-size N") from e


def choose_image_size(cfg: HuseConfig, ds: Dataset, train_rows: np.ndarray, seed: int) -> dict[str, Any]:
    """Resolve image_size="auto" in place from the training photos' sizes; a number stays as given."""
    if cfg.image_size != "auto":
        return {"requested": cfg.image_size, "chosen": cfg.image_size}
    rows = np.random.default_rng(seed).permutation(train_rows)[:SIZE_SAMPLE]
    median = float(np.median([_photo_side(ds.images[i]) for i in rows.tolist()]))
    cfg.image_size = int(min(IMAGE_SIZES[1], max(IMAGE_SIZES[0], 32 * round(median / 32))))
    return {"requested": "auto", "median_side": median, "photos": len(rows), "chosen": cfg.image_size}


def _probs(logits: torch.Tensor) -> np.ndarray:
    return logits.softmax(-1).cpu().numpy()


def _sigmoid_probs(logits: torch.Tensor) -> np.ndarray:
    return logits.sigmoid().cpu().numpy()


def accuracy_report(probs: np.ndarray, y: np.ndarray, hierarchy: Hierarchy) -> dict[str, Any]:
    """top-1/top-5 on leaves and top-1 per hierarchy level. Level k counts the items whose class reaches it (a leaf
    of depth d counts toward levels 1..d); a level no item reaches is left out."""
    top5 = np.argsort(-probs, axis=1)[:, :5]
    report = {"top1": float((top5[:, 0] == y).mean()), "top5": float((top5 == y[:, None]).any(axis=1).mean()), "levels": {}}
    for k in range(1, hierarchy.depth + 1):
        node = hierarchy.class_nodes(k)
        reach = node[y] >= 0
        if reach.any():
            pred, true = hierarchy.level_probs(probs[reach], k).argmax(1), node[y[reach]]
            report["levels"][str(k)] = float((pred == true).mean())
    return report


# ----------------------------------------------------------------------------------------
# Features


def _cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def backbone_features(backbone: torch.nn.Module, size: tuple[int, int]):
    """Yields a function from a float32 image batch (N, 3, H, W) to the frozen backbone's features (N, F).

    On the CPU the backbone runs in onnxruntime (the runtime's OnnxrtRunner over a temporary ONNX file
    exported as export/ does), which computes the same features with fused Conv+BN+Clip kernels: on
    2,048 fashion-products photos at 64 px, in one process on a busy shared 2-core machine, 1,300 CPU-us
    a photo against torch's 7,500 (channels_last; inference_mode, batch 512 or a frozen TorchScript trace
    changed that by 0-17%); the features agree to 1e-4 on values up to 45 (float32 rounding). On a GPU
    it runs in torch. benchmarks/experiments/feature_extraction.py measures the two side by side.

    Args:
        backbone: the frozen backbone (eval mode), on the device it is to run on.
        size: (height, width) of the images, fixed in the exported graph as in a bundle's.
    Yields:
        features(x: np.ndarray) -> torch.Tensor on the CPU.
    """
    device = next(backbone.parameters()).device
    if device.type != "cpu":
        with torch.no_grad():
            yield lambda x: backbone(torch.from_numpy(x).to(device)).cpu()
        return
    import warnings

    from huse.runtime.backends.onnxrt.runner import OnnxrtRunner

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "backbone.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
            torch.onnx.export(backbone.eval(), (torch.zeros(1, 3, *size),), str(path), dynamo=False,
                              opset_version=17, input_names=["image"], output_names=["features"],
                              dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})
        # Spinning off: training shares its machine (on 2 cores with a busy neighbour spinning cost 30%, TOOLCHAIN.md).
        with OnnxrtRunner(path, threads=torch.get_num_threads(), spinning=False) as runner:
            yield lambda x: torch.from_numpy(runner.infer({"image": x})["features"])


def extract_image_features(model: HUSE, ds: Dataset, spec: ImageSpec, cache: Path | None, batch: int) -> torch.Tensor:
    """Backbone features of every image, computed once and cached in `cache` (frozen backbone; None: not cached)."""
    key = _cache_key({"backbone": model.cfg.backbone, "spec": spec.to_dict(), "source": ds.source,
                      "ids": hashlib.sha256("\n".join(ds.product_ids).encode()).hexdigest(), "n": len(ds.images)})
    path = cache / f"image-features-{key}.safetensors" if cache else None
    if path and path.is_file():
        return load_file(str(path))["features"]
    feats = []
    with backbone_features(model.backbone, spec.size) as features:
        for s in tqdm(range(0, len(ds.images), batch), desc="image features", unit="batch", mininterval=2):
            feats.append(features(np.stack([load_image(img, spec) for img in ds.images[s:s + batch]])))
    out = torch.cat(feats)
    if path:
        cache.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic({"features": out}, path)
    return out


def encode_titles(tokenizer, titles: list[str]) -> dict[str, torch.Tensor]:
    inputs = tokenizer.inputs([normalise_title(t) or "" for t in titles])
    return {k: torch.from_numpy(v) for k, v in inputs.items()}


def extract_text_features(model: HUSE, inputs: dict[str, torch.Tensor], cache: Path, batch: int = 256) -> torch.Tensor:
    """Frozen text-encoder (MiniLM) features, computed once and cached."""
    ids = inputs["input_ids"]
    key = _cache_key({"encoder": model.cfg.text_encoder, "ids": hashlib.sha256(ids.numpy().tobytes()).hexdigest()})
    path = cache / f"text-features-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    feats, device = [], next(model.text_encoder.parameters()).device
    with torch.no_grad():
        for s in tqdm(range(0, len(ids), batch), desc="text features", unit="batch", mininterval=2):
            feats.append(model.text_features(ids[s:s + batch].to(device),
                                             inputs["attention_mask"][s:s + batch].to(device)).cpu())
    out = torch.cat(feats)
    cache.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic({"features": out}, path)
    return out


# ----------------------------------------------------------------------------------------
# Training


class Trainer:
    """Trains HUSE on a Dataset into a run directory.

    Args:
        ds: the data, with train/val/test splits.
        out: the run directory.
        model_cfg: model settings (num_classes and vocab_size are filled in here).
        train_cfg: optimisation and loss settings.
        backbone_weights: weights file for backbones that ship none.
        resume: continue from out/checkpoint.safetensors if present.
        cache: folder of the frozen-feature cache (default: out/cache); cross-validation folds share the run's.
    """

    def __init__(self, ds: Dataset, out: str | Path, model_cfg: HuseConfig, train_cfg: TrainConfig,
                 backbone_weights: str | None = None, resume: bool = False, cache: str | Path | None = None):
        self.ds, self.out, self.tc = ds, Path(out), train_cfg
        self.cache, self.backbone_weights = Path(cache) if cache else self.out / "cache", backbone_weights
        if not resume and self.out.is_dir():  # a run writes its files by these names: never over a user's own
            foreign = sorted(p.name for p in self.out.iterdir() if _run_entry(p.name) not in RUN_ENTRIES)
            if foreign:
                raise HuseError(f"--out {self.out} holds files a training run does not write ({', '.join(foreign[:3])}"
                                f"{', ...' if len(foreign) > 3 else ''}); choose a new --out")
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(train_cfg.seed)
        np.random.seed(train_cfg.seed)
        # Multi-label (several `|`-separated paths per product, or --multi-label): train/multilabel.py.
        self.multi = model_cfg.multi_label = bool(model_cfg.multi_label or is_multi_label(ds.classes))
        if model_cfg.label_head not in multilabel.HEADS:
            raise HuseError(f"multi-label head {model_cfg.label_head!r} not found; available = {list(multilabel.HEADS)}")
        if model_cfg.label_loss not in multilabel.LOSSES:
            raise HuseError(f"multi-label loss {model_cfg.label_loss!r} not found; available = {list(multilabel.LOSSES)}")
        self.labels = sorted({p for c in ds.classes for p in c.split(PATH_SEPARATOR)})
        self.hierarchy = Hierarchy(self.labels)
        self.y = (torch.from_numpy(multilabel.multi_hot(ds.classes, self.labels)) if self.multi
                  else torch.tensor([self.labels.index(c) for c in ds.classes]))
        # Product ids as integers: the instance-level loss treats all items of a product as positives.
        self.product = torch.from_numpy(np.unique(np.asarray(ds.product_ids), return_inverse=True)[1].astype(np.int64))
        info = backbone_info(model_cfg.backbone)
        self.split = {s: torch.from_numpy(ds.indices(s)) for s in ("train", "val", "test")}
        if train_cfg.image_views and not model_cfg.freeze_backbone:
            raise HuseError(f"--image-views {train_cfg.image_views} caches views through a frozen backbone; with "
                            "--fine-tune the backbone sees each photo anew every step: drop one of the two")
        self.size_choice = choose_image_size(model_cfg, ds, self.split["train"].numpy(), train_cfg.seed)
        self.spec = ImageSpec(size=(model_cfg.image_size, model_cfg.image_size), mean=info.mean, std=info.std)
        self.cv = self._cv_plan()
        if self.cv["folds"] and self.tc.final_fit == "train":  # the chosen settings are for a model trained on train + val
            self.tc = replace(self.tc, final_fit="train+val")
        self.text_choice = choose_text_encoder(model_cfg, ds, self.split)
        resolve_arch(model_cfg)
        if model_cfg.text_encoder == "minilm":
            from huse.train.minilm import minilm_tokenizer

            self.tokenizer = minilm_tokenizer(max_len=32)
            model_cfg.max_len, model_cfg.text_feature_dim = 32, 384
        else:
            train_titles = [ds.titles[i] for i in self.split["train"].tolist()]
            self.tokenizer = WordTokenizer.build(train_titles, max_len=model_cfg.max_len)
            model_cfg.vocab_size = len(self.tokenizer.vocab) + 2
        model_cfg.num_classes = len(self.labels)
        self.mc = model_cfg
        # Caches, labels and inputs stay on the CPU; each batch goes to the device.
        self.device = resolve_device(train_cfg.device)
        self.model = build_model(model_cfg, backbone_weights).to(self.device)
        self.class_names = self._class_name_plan()
        self._init_from_names()
        self.class_dist = torch.from_numpy(class_distances(self.hierarchy, train_cfg.class_distance)).to(self.device)
        self.text_inputs = encode_titles(self.tokenizer, ds.titles)
        self.epoch = 0
        self.best: dict[str, Any] = {"val_loss": math.inf, "epoch": 0}
        self.gen = torch.Generator().manual_seed(train_cfg.seed)  # the shuffle order
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        self.history: list[dict[str, float]] = []
        if resume:
            self._load_checkpoint()
        elif (self.out / "state.json").exists():
            raise HuseError(f"{self.out} already holds a run; pass --resume to continue it or choose a new --out")

    def _cv_plan(self) -> dict[str, Any]:
        """How many cross-validation folds this run uses (TrainConfig.cv_folds), and why."""
        idx, asked = torch.cat([self.split["train"], self.split["val"]]).numpy(), self.tc.cv_folds
        y, groups = self._fold_labels(idx)
        rows, products, allowed = len(idx), len(np.unique(groups)), fold_count(y, groups, asked or CV_FOLDS)
        if asked is None:
            if rows >= KFOLD_MAX_ROWS:
                return {"folds": 0, "reason": f"auto: {rows} train + val rows >= {KFOLD_MAX_ROWS}"}
            if allowed < CV_FOLDS:
                return {"folds": 0, "reason": f"auto: {products} train + val products allow {allowed} folds by product, "
                                              f"fewer than {CV_FOLDS}"}
            return {"folds": CV_FOLDS, "reason": f"auto: {rows} train + val rows < {KFOLD_MAX_ROWS}"}
        if asked > allowed:
            raise HuseError(f"--cv-folds {asked}: train + val ({products} products, at most "
                            f"{np.bincount(y).max(initial=0)} rows a class) allow only "
                            f"{allowed} folds by product; pass fewer folds, or --cv-folds 0")
        return {"folds": asked, "reason": f"cv_folds={asked}"}

    # -- class-name prior ----------------------------------------------------------------
    def _class_name_plan(self) -> dict[str, Any]:
        """Whether the class-name prior applies (TrainConfig.class_name_init / class_name_prior), and the names' inputs.

        MiniLM reads any name. The word CNN knows only the training titles' words: a name none of whose words it
        knows is the out-of-vocabulary id alone, the same point for every such class, so the prior is skipped
        unless every class name has a known word (the share of known name words is recorded either way).
        """
        if not (self.tc.class_name_init or self.tc.class_name_prior):
            return {"applied": False}
        titles = [class_name_title(label) for label in self.labels]
        self.name_inputs = encode_titles(self.tokenizer, titles)
        plan: dict[str, Any] = {"applied": True, "init": self.tc.class_name_init, "weight": self.tc.class_name_prior}
        if self.mc.text_encoder == "cnn":
            vocab = self.tokenizer.vocab
            known = [[w in vocab for w in words(t)] for t in titles]
            plan["known_word_share"] = round(sum(map(sum, known)) / max(1, sum(map(len, known))), 4)
            unknown = [t for t, k in zip(titles, known) if not any(k)]
            if unknown:
                plan.update(applied=False, reason=f"{len(unknown)} of {len(titles)} class names have no word the word "
                                                  f"CNN knows (e.g. {unknown[0]!r})")
            self.name_feats = None
        else:  # MiniLM is frozen: the names' features are computed once
            with torch.no_grad():
                self.model.eval()
                self.name_feats = self.model.text_features(self.name_inputs["input_ids"].to(self.device),
                                                           self.name_inputs["attention_mask"].to(self.device))
        return plan

    def _name_emb(self) -> torch.Tensor:
        """The class names through the current text tower, (num_classes, embed_dim)."""
        if self.name_feats is not None:
            return self.model.embed_text_features(self.name_feats)
        return self.model.embed_text(self.name_inputs["input_ids"].to(self.device), None)

    def _names_alone(self) -> dict[str, float]:
        """How well the class names alone classify the training titles (frozen MiniLM, cosine, no training): where
        they do poorly the prior points the wrong way (docs/quality.md, "Class-name prior"). Empty where it cannot be said."""
        if self.name_feats is None or self.text_feats is None or self.multi:
            return {}
        train = self.split["train"]
        guess = (self.text_feats[train].to(self.device) @ self.name_feats.T).argmax(1).cpu()
        return {"train_top1_by_names": round(float((guess == self.y[train]).float().mean()), 4)}

    def _init_from_names(self) -> None:
        if self.class_names["applied"] and self.tc.class_name_init:
            self.model.eval()  # the names' embedding without dropout
            with torch.no_grad():
                init_classifier_from_names(self.model.classifier, self._name_emb())

    # -- features -----------------------------------------------------------------------
    def _prepare_features(self) -> None:
        cache = self.cache
        self.frozen = self.mc.freeze_backbone
        if self.frozen:
            self.image_feats = extract_image_features(self.model, self.ds, self.spec, cache, self.tc.feature_batch)
            self.model.feature_norm.set_stats(self.image_feats[self.split["train"]])
            self.image_views = self._view_features() if self.tc.image_views else None
        self.text_feats = (extract_text_features(self.model, self.text_inputs, cache)
                           if self.mc.text_encoder == "minilm" else None)

    def _view_features(self) -> torch.Tensor:
        """The cached features of TrainConfig.image_views random crops of every photo outside test (the rows any model
        of this run trains on: train, a cross-validation fold's train, the final fit's train + val)."""
        from huse.train.views import AREA, RATIO, view_features

        rows = np.flatnonzero(np.asarray(self.ds.splits) != "test")
        key = _cache_key({"backbone": self.mc.backbone, "spec": self.spec.to_dict(), "source": self.ds.source,
                          "ids": hashlib.sha256("\n".join(self.ds.product_ids).encode()).hexdigest(),
                          "rows": hashlib.sha256(rows.tobytes()).hexdigest(), "views": self.tc.image_views,
                          "seed": self.tc.seed, "area": AREA, "ratio": RATIO})
        path = self.cache / f"image-views-{key}.safetensors"
        if path.is_file():
            return load_file(str(path))["features"]
        out = view_features(self.model.backbone.eval(), self.ds.images, rows, self.spec, self.tc.image_views,
                            self.tc.seed, self.tc.feature_batch)
        self.cache.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic({"features": out}, path)
        return out

    def _image_emb(self, idx: torch.Tensor, view: bool = False) -> torch.Tensor:
        """Image embeddings of rows `idx`; with `view` (training steps) each row's features are one of its
        cached views or the plain photo, drawn at random, where the run has views."""
        if self.frozen and view and self.image_views is not None:
            k = torch.randint(0, len(self.image_views) + 1, (len(idx),), generator=self.gen)
            f = torch.where((k == 0)[:, None], self.image_feats[idx], self.image_views[(k - 1).clamp_min(0), idx])
        elif self.frozen:
            f = self.image_feats[idx]
        else:  # fine-tuning: the backbone runs on every batch
            x = torch.from_numpy(np.stack([load_image(self.ds.images[i], self.spec) for i in idx.tolist()]))
            f = self.model.image_features(x.to(self.device))
        return self.model.embed_image_features(f.to(self.device))

    def _text_emb(self, idx: torch.Tensor) -> torch.Tensor:
        if self.text_feats is not None:
            return self.model.embed_text_features(self.text_feats[idx].to(self.device))
        return self.model.embed_text(self.text_inputs["input_ids"][idx].to(self.device), None)

    # -- checkpoints ----------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        skip = ("backbone.",) if self.mc.freeze_backbone else ()
        skip += ("text_encoder.",) if self.mc.text_encoder == "minilm" else ()
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith(skip)}

    # A checkpoint is three files; each is written atomically, but a kill between them used to leave
    # epoch N's weights beside epoch N-1's optimizer and RNG state, and the resumed run drifted
    # silently (tests/reliability/test_kill_train.py). So the two tensor files are staged as
    # *.next, state.json (the commit point) records their sha256, and only then are they renamed
    # into place; a resume finishes renames a kill interrupted.
    CHECKPOINT_FILES = ("checkpoint.safetensors", "optimizer.safetensors")

    def _save_checkpoint(self) -> None:
        opt = self.optimizer.state_dict()
        flat = {f"{pid}.{name}": (t if torch.is_tensor(t) else torch.tensor(t))
                for pid, st in opt["state"].items() for name, t in st.items()}
        # The random states (dropout, shuffling) travel too, so a resumed run is bit-exact on CPU.
        flat["rng.torch"], flat["rng.shuffle"] = torch.get_rng_state(), self.gen.get_state()
        if self.device.type == "cuda":  # dropout on the GPU draws from its own generator
            flat["rng.cuda"] = torch.cuda.get_rng_state()
        digests = {}
        for name, tensors in zip(self.CHECKPOINT_FILES, (self._trainable_state(), flat)):
            save_safetensors_atomic(tensors, self.out / f"{name}.next")
            digests[name] = sha256_file(self.out / f"{name}.next")
        # state.json: what marks the checkpoint as complete, and which bytes it is.
        write_json_atomic(self.out / "state.json", {"epoch": self.epoch, "history": self.history, "best": self.best,
                                                    "param_groups": opt["param_groups"], "files": digests})
        for name in self.CHECKPOINT_FILES:
            os.replace(self.out / f"{name}.next", self.out / name)

    def _checkpoint_files(self, state: dict[str, Any]) -> None:
        """Make the files state.json names current (finishing an interrupted rename), or refuse."""
        for name, digest in state.get("files", {}).items():  # runs from before the digests: no check
            path, staged = self.out / name, self.out / f"{name}.next"
            if path.is_file() and sha256_file(path) == digest:
                continue
            if staged.is_file() and sha256_file(staged) == digest:
                os.replace(staged, path)
                continue
            raise HuseError(f"--resume: {path} is not the checkpoint {self.out / 'state.json'} records (changed or "
                            "damaged); start a new run with another --out")

    def _load_checkpoint(self) -> None:
        state_path = self.out / "state.json"
        if not state_path.is_file():
            raise HuseError(f"--resume: no checkpoint in {self.out} (state.json missing); start without --resume")
        state = json.loads(state_path.read_text())
        self._checkpoint_files(state)
        mismatch = HuseError(f"--resume: the checkpoint in {self.out} does not fit this model or its options (was it "
                             f"trained with others? they are in {self.out / 'config.json'} once it finishes); resume with "
                             "the same options, or start a new run with another --out")
        try:
            missing, unexpected = self.model.load_state_dict(load_file(str(self.out / "checkpoint.safetensors")), strict=False)
            if unexpected or any(k for k in missing if k in self._trainable_state()):
                raise mismatch
            flat = load_file(str(self.out / "optimizer.safetensors"))
            torch.set_rng_state(flat.pop("rng.torch"))
            self.gen.set_state(flat.pop("rng.shuffle"))
            cuda_rng = flat.pop("rng.cuda", None)
            if cuda_rng is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_rng)
            opt_state: dict[int, dict[str, torch.Tensor]] = {}
            for key, t in flat.items():
                pid, name = key.split(".", 1)
                opt_state.setdefault(int(pid), {})[name] = t
            self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or parameter groups differ
            raise mismatch from e
        self.epoch, self.history, self.best = state["epoch"], state["history"], state["best"]

    # -- loop ---------------------------------------------------------------------------
    def _lr(self, step: int, total: int) -> float:
        return self.tc.lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))  # cosine decay

    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Train (continuing after a resume) until the budget or early stopping, restore the best
        checkpoint by validation loss, then evaluate, compare with the baselines and save."""
        self._prepare_features()
        self._train(progress)
        return self.finish(progress)

    def _train(self, progress: bool = True, desc: str = "training") -> None:
        """The training loop: epochs over train until the budget or early stopping on val, then the best
        epoch's weights restored (what every model of a run goes through, cross-validation folds included)."""
        train_idx = self.split["train"]
        steps_per_epoch = math.ceil(len(train_idx) / self.tc.batch_size)
        epochs = self.tc.total_epochs(steps_per_epoch)
        total = steps_per_epoch * epochs
        patience = max(self.tc.patience, 3 * steps_per_epoch) if self.tc.patience else 0
        bar = tqdm(total=total, initial=self.epoch * steps_per_epoch, desc=desc, unit="step", disable=not progress, mininterval=2)
        while self.epoch < epochs and not self._stopped(steps_per_epoch, patience):
            sums = self._train_epoch(train_idx, self.epoch * steps_per_epoch, total, bar)
            self.epoch += 1
            val = self.predict("val")
            if self.multi:  # threshold-free: 2 - val mAP of image and text (train/multilabel.py)
                maps = [multilabel.mean_average_precision(val[m], val["y"]) for m in ("image", "text")]
                val_loss = 2.0 - sum(maps)
                sums.update(epoch=self.epoch, step=self.epoch * steps_per_epoch, val_loss=val_loss,
                            val_image_map=maps[0], val_text_map=maps[1])
            else:
                val_loss = _calibrated_nll(val["image"], val["y"]) + _calibrated_nll(val["text"], val["y"])
                sums.update(epoch=self.epoch, step=self.epoch * steps_per_epoch, val_loss=val_loss,
                            val_image_top1=accuracy_report(val["image"], val["y"], self.hierarchy)["top1"],
                            val_text_top1=accuracy_report(val["text"], val["y"], self.hierarchy)["top1"])
            self.history.append(sums)
            if val_loss < self.best["val_loss"]:
                self.best = {"val_loss": val_loss, "epoch": self.epoch}
                save_safetensors_atomic(self._trainable_state(), self.out / "best.safetensors")
            shown = ("val_image_map", "val_text_map") if self.multi else ("val_image_top1", "val_text_top1")
            # refresh=False: shown at the bar's next timed refresh (mininterval), not at once; a small catalog's
            # epoch is one step, and refreshing on each wrote every step into a log file.
            bar.set_postfix(loss=f"{sums['loss']:.3f}", val_loss=f"{val_loss:.3f}", val_img=f"{sums[shown[0]]:.3f}",
                            val_txt=f"{sums[shown[1]]:.3f}", refresh=False)
            self._save_checkpoint()
        if self.epoch < epochs:  # say why the bar ends short of its total (it read as a run that died)
            watched = "val mAP" if self.multi else "val loss"  # what early stopping reads (the loop above)
            bar.set_description(f"{desc}: stopped early, no better {watched} in {patience} steps; best epoch "
                                f"{self.best['epoch']} of {self.epoch}", refresh=False)
        bar.close()
        # The best epoch's weights, not the last: early stopping's point.
        self.model.load_state_dict(load_file(str(self.out / "best.safetensors")), strict=False)

    def _train_epoch(self, rows: torch.Tensor, first_step: int, total: int, bar) -> dict[str, float]:
        """One pass over `rows` in a seeded random order (the LR follows step first_step + k of `total`); the mean losses."""
        self.model.train()
        self.model.backbone.train(not self.mc.freeze_backbone)
        perm = rows[torch.randperm(len(rows), generator=self.gen)]
        steps = math.ceil(len(rows) / self.tc.batch_size)
        sums: dict[str, float] = {}
        for s in range(0, len(perm), self.tc.batch_size):
            idx = perm[s:s + self.tc.batch_size]
            for g in self.optimizer.param_groups:
                g["lr"] = self._lr(first_step + s // self.tc.batch_size, total)
            ie, te = self._image_emb(idx, view=True), self._text_emb(idx)
            loss, parts = huse_loss(ie, te, self.model.classifier(ie), self.model.classifier(te),
                                    self.y[idx].to(self.device), self.class_dist, alpha=self.tc.alpha,
                                    beta=self.tc.beta, gamma=self.tc.gamma, margin=self.tc.margin,
                                    delta=self.tc.delta, tau=self.tc.tau, product=self.product[idx].to(self.device),
                                    image_view=self._image_emb(idx, view=True) if self.tc.delta and self.frozen else None,
                                    head=self.mc.label_head, label_loss=self.mc.label_loss)
            if self.class_names["applied"] and self.tc.class_name_prior:
                prior = class_name_loss(self.model.classifier, self._name_emb())
                loss = loss + self.tc.class_name_prior * prior
                parts.update(loss=float(loss.detach()), class_name=float(prior.detach()))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / steps
            bar.update(1)
        return sums

    def _stopped(self, steps_per_epoch: int, patience: int) -> bool:
        return bool(patience) and (self.epoch - self.best["epoch"]) * steps_per_epoch >= patience

    @torch.no_grad()
    def predict(self, split: str) -> dict[str, np.ndarray]:
        """Image and text probabilities and labels of a split (eval mode)."""
        self.model.eval()
        idx = self.split[split]
        img, txt = [], []
        probs = _sigmoid_probs if self.multi and self.mc.label_head == "sigmoid" else _probs
        for s in range(0, len(idx), 1024):
            b = idx[s:s + 1024]
            img.append(probs(self.model.classifier(self._image_emb(b))))
            txt.append(probs(self.model.classifier(self._text_emb(b))))
        return {"image": np.concatenate(img), "text": np.concatenate(txt), "y": self.y[idx].numpy(),
                "product": self.product[idx].numpy()}

    def _baseline_inputs(self) -> tuple[np.ndarray, np.ndarray | list[str]]:
        """What the baselines read: the frozen image features, and the frozen text features (or the titles)."""
        if self.frozen:
            image = self.image_feats.numpy()
        else:  # fine-tuning: the baseline uses the pretrained backbone's features (not cached: a one-off)
            image = extract_image_features(build_model(self.mc).to(self.device).eval(), self.ds, self.spec, None,
                                           self.tc.feature_batch).numpy()
        return image, self.text_feats.numpy() if self.text_feats is not None else self.ds.titles

    def baselines(self) -> dict[str, Any]:
        """Tuned and scikit-learn-defaults logistic-regression baselines on the same split and frozen features,
        cross-validated by product (huse.train.baselines.logistic_baselines)."""
        splits = {s: self.split[s].numpy() for s in ("val", "test") if len(self.split[s])}
        image, text = self._baseline_inputs()
        final = (torch.cat([self.split[s] for s in FINAL_FITS[self.tc.final_fit]]).numpy()
                 if self.tc.final_fit != "train" else None)
        return logistic_baselines(image, text, self.y.numpy(), len(self.labels), self.split["train"].numpy(), splits,
                                  groups=self.product.numpy(), seed=self.tc.seed, final=final)

    def finish(self, progress: bool = True) -> dict[str, Any]:
        """Choose the fusion weight and temperatures on val (or by k-fold cross-validation, cross_validate); write
        metrics (HUSE beside the baselines), the confusion matrix and the shipped model (refitted on more rows with
        --final-fit or --cv-folds)."""
        val, test = self.predict("val"), self.predict("test") if len(self.split["test"]) else None
        cv, oof = self.cross_validate(progress) if self.cv["folds"] else (None, None)
        w = cv["image_weight"] if cv else self._fusion_weight(val)
        for pr in (val, test):
            if pr is not None:
                pr["fused"] = w * pr["image"] + (1 - w) * pr["text"]
        metrics: dict[str, Any] = {"fusion_image_weight": w, "split_sizes": self.ds.split_sizes(), "text_encoder": self.text_choice,
                                   **({"image_size": self.size_choice} if self.size_choice["requested"] == "auto" else {}),
                                   "skipped_rows": len(self.ds.skipped), "best_epoch": self.best["epoch"],
                                   "epochs_run": self.epoch, "history": self.history}
        if cv or self.cv["folds"] != self.tc.cv_folds:  # ran, or "auto" decided: runs without either keep their bytes
            metrics["cv"] = cv or self.cv
        if self.tc.class_name_init or self.tc.class_name_prior:  # asked for: whether it applied, and why not
            metrics["class_names"] = {**self.class_names, **self._names_alone()}
        if self.multi:
            inputs = self._baseline_inputs()  # once: with --fine-tune it extracts the pretrained features
            extra = self._evaluate_multilabel(val, test, metrics, inputs, oof)
            metrics["final_fit"] = self._final_fit(w, progress, cv, extra["thresholds"])
            if "test" in metrics["final_fit"]:  # the tuned one-vs-rest LR fitted on the same rows, as carefully
                metrics["final_fit"]["baseline_test"], metrics["final_fit"]["baseline_info"] = self._ovr_final(test, inputs)
            extra["final_fit"] = {k: metrics["final_fit"][k] for k in ("rows", "splits", "items", "epochs")}
        else:
            base = self.baselines()
            calibration = calibration_report(val, test, val["y"], test["y"] if test else None, fit=oof)
            metrics["calibration"] = calibration
            for name, pr in (("val", val), ("test", test)):
                if pr is None:
                    continue
                metrics[name] = {mode: accuracy_report(pr[mode], pr["y"], self.hierarchy) for mode in MODES}
                for key, kind in (("baseline", "tuned"), ("baseline_defaults", "defaults")):
                    metrics.setdefault(key, {})[name] = {mode: accuracy_report(base[kind][name][mode], pr["y"], self.hierarchy)
                                                         for mode in MODES}
            metrics["baseline_settings"] = base["settings"]
            metrics["verdict"] = baseline_verdict(metrics)
            final = test or val
            confusion_png(final["fused"], final["y"], self.labels, self.out / "confusion_matrix.png")
            metrics["final_fit"] = self._final_fit(w, progress, cv)
            if "test" in metrics["final_fit"]:  # the tuned LR fitted on the same rows, for a comparison on equal data
                metrics["final_fit"]["baseline_test"] = {mode: accuracy_report(base["tuned_final"]["test"][mode], test["y"],
                                                                               self.hierarchy) for mode in MODES}
            extra = {"calibration": {"temperature": calibration["temperature"]},
                     "final_fit": {k: metrics["final_fit"][k] for k in ("rows", "splits", "items", "epochs")}}
        save_safetensors_atomic(self.model.state_dict(), self.out / "model.safetensors")
        self.tokenizer.save(self.out / ("vocab.json" if self.mc.text_encoder == "cnn" else "tokenizer.json"))
        write_json_atomic(self.out / "config.json", {
            "model": self.mc.to_dict(), "train": asdict(self.tc), "labels": self.labels, "data": self.ds.source,
            "skipped": self.ds.skipped, "preprocessing": self.spec.to_dict(),
            "tokenizer": self.tokenizer.spec("vocab.json" if self.mc.text_encoder == "cnn" else "tokenizer.json"),
            "fusion": {"image_weight": w}, **extra,
            "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_json_atomic(self.out / "metrics.json", metrics)
        return metrics

    def _fusion_weight(self, pr: dict[str, np.ndarray]) -> float:
        """The image weight with the best fused top-1 (multi-label: micro-F1) on these predictions."""
        if self.multi:
            return multilabel.best_fusion_weight(pr["image"], pr["text"], pr["y"], pr["product"])
        return best_weight(pr["image"], pr["text"], pr["y"])[0]

    def _final_fit(self, w: float, progress: bool, cv: dict[str, Any] | None,
                   thresholds: dict[str, list[float]] | None = None) -> dict[str, Any]:
        """The shipped model: refitted on the final-fit splits (refit), or the held-out model itself."""
        if self.tc.final_fit != "train":
            return self.refit(w, progress, cv["epochs"] if cv else None, thresholds)
        return {"rows": "train", "splits": ["train"], "items": len(self.split["train"]), "epochs": self.best["epoch"]}

    def _fold_labels(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What folds of `rows` are stratified by and grouped by: each row's class (multi-label: its first class)
        and its product."""
        y = self.y[rows].numpy()
        return (y.argmax(1) if self.multi else y), self.product.numpy()[rows]

    def _product_folds(self, rows: np.ndarray, k: int) -> list:
        """k folds of `rows` (positions into them) that never split a product, stratified by class (multi-label:
        by each row's first class)."""
        return product_folds(*self._fold_labels(rows), k, self.tc.seed, sample=False)[1]

    def cross_validate(self, progress: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Choose the epochs, the fusion weight and the temperatures by k-fold cross-validation by product.

        Train + val are cut into `self.cv["folds"]` folds that never split a product (stratified by
        class where the products allow it). One model per fold goes through the same training loop as
        the run's own model (`_train`, early stopping on the held-out fold, the best epoch restored), in
        out/cv/fold-K (resumable; the feature cache is the run's). Then:
        - epochs: the median of the folds' best epochs. The mean of their val curves would need every
          fold run to the whole step budget (early stopping ends small-catalog runs after a sixth of
          it), and the median is not moved by one fold whose small val split bottoms out early or late;
        - fusion image weight: the best fused top-1 (multi-label: micro-F1) on the pooled out-of-fold
          predictions (every train + val row, predicted by the one model that did not see it);
        - temperatures (multi-label: the thresholds): fitted on the same pooled predictions (by finish,
          through calibration_report or _evaluate_multilabel).

        Returns:
            (the summary metrics.json records: folds, rows, products, the chosen settings, the pooled
            top-1 (multi-label: mAP) per mode and, per fold, its size, best epoch, val top-1 (val_map)
            per mode at the chosen weight and the fusion weight it alone would choose; the pooled
            probabilities per mode, "y" and "product").
        """
        rows = torch.cat([self.split["train"], self.split["val"]]).numpy()
        products = self.product.numpy()
        folds = self._product_folds(rows, self.cv["folds"])
        fold_cfg = replace(self.tc, cv_folds=0, final_fit="train")
        pooled: dict[str, list[np.ndarray]] = {"image": [], "text": [], "y": [], "product": []}
        per_fold = []
        for k, (_, held) in enumerate(folds, 1):
            splits = list(self.ds.splits)
            for i in rows.tolist():
                splits[i] = "train"
            for i in rows[held].tolist():
                splits[i] = "val"
            out = self.out / "cv" / f"fold-{k}"
            fold = Trainer(replace(self.ds, splits=splits), out, replace(self.mc), fold_cfg, self.backbone_weights,
                           resume=(out / "state.json").is_file(), cache=self.cache)
            fold._prepare_features()
            fold._train(progress, desc=f"fold {k}/{len(folds)}")
            pr = fold.predict("val")
            for key in pooled:
                pooled[key].append(pr[key])
            per_fold.append({"fold": k, "products": int(len(np.unique(products[rows[held]]))), "items": int(len(held)),
                             "best_epoch": fold.best["epoch"], "epochs_run": fold.epoch, "pr": pr,
                             "image_weight": self._fusion_weight(pr)})
            del fold
        oof = {key: np.concatenate(v) for key, v in pooled.items()}
        w = self._fusion_weight(oof)
        oof["fused"] = w * oof["image"] + (1 - w) * oof["text"]
        # threshold-free scores: top-1, or mAP for multi-label (its micro-F1 depends on thresholds fitted on these rows)
        metric, score = (("map", multilabel.mean_average_precision) if self.multi
                         else ("top1", lambda p, y: float((p.argmax(1) == y).mean())))
        for f in per_fold:
            pr = f.pop("pr")
            pr["fused"] = w * pr["image"] + (1 - w) * pr["text"]
            f[f"val_{metric}"] = {mode: round(score(pr[mode], pr["y"]), 4) for mode in MODES}
        bests = [f["best_epoch"] for f in per_fold]
        summary = {"folds": len(folds), "reason": self.cv["reason"], "rows": int(len(rows)),
                   "products": int(len(np.unique(products[rows]))),
                   "epochs_rule": "median of the folds' best epochs", "epochs": max(1, int(round(float(np.median(bests))))),
                   "image_weight": w, metric: {mode: round(score(oof[mode], oof["y"]), 4) for mode in MODES},
                   "per_fold": per_fold}
        return summary, oof

    def refit(self, w: float, progress: bool = True, epochs: int | None = None,
              thresholds: dict[str, list[float]] | None = None) -> dict[str, Any]:
        """Train a fresh model on the rows of the final-fit splits with the settings chosen on val (or by k-fold
        cross-validation).

        The same number of epochs as the held-out model's best (or `epochs`), on the same learning-rate
        schedule measured in epochs; the fusion weight and the temperatures (multi-label: the thresholds)
        stay those chosen before (the refit has no val to choose them on). The word CNN's vocabulary is
        rebuilt from all those titles, so val's words are no longer out of vocabulary. Where a split stays
        held out (test, with "train+val"), the refit model is evaluated on it too.

        Args:
            w: the fusion image weight.
            progress: show a progress bar.
            epochs: epochs to train (default: the held-out model's best epoch).
            thresholds: multi-label: the shipped thresholds per mode, for the held-out splits' reports.
        Returns:
            What the shipped model saw: rows, splits, items, epochs, and its accuracy (multi-label: its
            multi-label report) per mode on the splits still held out.
        """
        splits = FINAL_FITS[self.tc.final_fit]
        rows = torch.cat([self.split[s] for s in splits])
        epochs = max(1, epochs or self.best["epoch"])
        budget = self.tc.total_epochs(math.ceil(len(self.split["train"]) / self.tc.batch_size))
        if self.mc.text_encoder == "cnn":
            self.tokenizer = WordTokenizer.build([self.ds.titles[i] for i in rows.tolist()], max_len=self.mc.max_len)
            self.mc.vocab_size = len(self.tokenizer.vocab) + 2
            self.text_inputs = encode_titles(self.tokenizer, self.ds.titles)
        torch.manual_seed(self.tc.seed)
        self.gen = torch.Generator().manual_seed(self.tc.seed)
        fresh = build_model(self.mc, load_pretrained=False).to(self.device)
        trained = set(self._trainable_state())
        fresh.load_state_dict({k: v for k, v in self.model.state_dict().items() if k not in trained}, strict=False)
        self.model = fresh  # frozen backbone (and MiniLM) kept, everything trained starts afresh
        if self.frozen:
            self.model.feature_norm.set_stats(self.image_feats[rows])
        self.class_names = self._class_name_plan()  # the word CNN's vocabulary is new
        self._init_from_names()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        steps_per_epoch = math.ceil(len(rows) / self.tc.batch_size)
        bar = tqdm(total=steps_per_epoch * epochs, desc=f"final fit ({self.tc.final_fit})", unit="step",
                   disable=not progress, mininterval=2)
        for epoch in range(epochs):
            self._train_epoch(rows, epoch * steps_per_epoch, steps_per_epoch * budget, bar)
        bar.close()
        out: dict[str, Any] = {"rows": self.tc.final_fit, "splits": list(splits), "items": len(rows), "epochs": epochs}
        for split in ("val", "test"):
            if split not in splits and len(self.split[split]):
                pr = self.predict(split)
                pr["fused"] = w * pr["image"] + (1 - w) * pr["text"]
                out[split] = {mode: (multilabel.multilabel_report(pr[mode], pr["y"], np.asarray(thresholds[mode]),
                                                                  self.hierarchy) if self.multi
                                     else accuracy_report(pr[mode], pr["y"], self.hierarchy)) for mode in MODES}
        return out


    def _evaluate_multilabel(self, val: dict[str, np.ndarray], test: dict[str, np.ndarray] | None,
                             metrics: dict[str, Any], inputs: tuple[np.ndarray, np.ndarray | list[str]],
                             oof: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Multi-label metrics of HUSE and the tuned one-vs-rest baseline into `metrics`; returns what
        config.json adds (per-class thresholds per mode; no temperatures: the thresholds are where the
        scores are read).

        The reports are the held-out model's, read at thresholds tuned on val. The shipped thresholds are
        those, or with k-fold cross-validation the ones tuned on the pooled out-of-fold predictions `oof`
        (five times the products val has, for the model refitted on train + val). `inputs`: _baseline_inputs().
        """
        splits = {s: self.split[s].numpy() for s in ("val", "test") if len(self.split[s])}
        image, text = inputs
        base, info = multilabel.ovr_baselines(image, text, self.y.numpy(), self.product.numpy(),
                                              self.split["train"].numpy(), splits)
        thresholds, reports = multilabel.evaluate(val, test, self.hierarchy, val["product"])
        base_val, base_test = ({**base[s], "y": pr["y"]} if pr is not None else None
                               for s, pr in (("val", val), ("test", test)))
        base_thresholds, base_reports = multilabel.evaluate(base_val, base_test, self.hierarchy, val["product"])
        if oof is not None:
            metrics["held_out_thresholds"] = thresholds
            thresholds = {m: [round(float(t), 4) for t in multilabel.tune_thresholds(oof[m], oof["y"], oof["product"])]
                          for m in MODES}
        metrics.update(task="multi-label", **reports, baseline=base_reports,
                       baseline_info={**info, "thresholds": base_thresholds,
                                      "model": "one-vs-rest logistic regression on the same frozen features"},
                       thresholds=thresholds, thresholds_from="out-of-fold predictions" if oof is not None else "val",
                       labels_per_product={s: float(self.y[self.split[s]].sum(1).float().mean()) for s in splits})
        metrics["verdict"] = multilabel.verdict(metrics)
        return {"task": "multi-label", "thresholds": thresholds,
                "calibration": {"temperature": {m: 1.0 for m in MODES}}}

    def _ovr_final(self, test: dict[str, np.ndarray], inputs: tuple[np.ndarray, np.ndarray | list[str]]
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """The tuned one-vs-rest LR fitted on the refit's rows (multilabel.ovr_final, over the same product folds
        cross-validation uses) and its test report per mode; its settings. `inputs`: _baseline_inputs()."""
        rows = torch.cat([self.split[s] for s in FINAL_FITS[self.tc.final_fit]]).numpy()
        image, text = inputs
        probs, info = multilabel.ovr_final(image, text, self.y.numpy(), self.product.numpy(), rows,
                                           self._product_folds(rows, self.cv["folds"] or CV_FOLDS),
                                           self.split["test"].numpy())
        report = {m: multilabel.multilabel_report(probs[m], test["y"], info["thresholds"][m], self.hierarchy) for m in MODES}
        info["thresholds"] = {m: [round(float(t), 4) for t in thr] for m, thr in info["thresholds"].items()}
        return report, info


def _calibrated_nll(p: np.ndarray, y: np.ndarray) -> float:
    """Validation NLL after the best temperature: the early-stopping criterion.

    Plain val loss turns up within a few epochs on small catalogs while accuracy still
    improves (the model grows overconfident); after temperature scaling the loss measures how
    well the classes are ranked, not how confident the model is, and follows accuracy.
    """
    return nll(temperature_scale(p, fit_temperature(p, y)), y)


def baseline_verdict(metrics: dict[str, Any]) -> dict[str, Any]:
    """Where HUSE is worse than the tuned logistic-regression baseline on validation, with the figures."""
    worse = {mode: {"huse": metrics["val"][mode]["top1"], "baseline": metrics["baseline"]["val"][mode]["top1"]}
             for mode in MODES if metrics["val"][mode]["top1"] < metrics["baseline"]["val"][mode]["top1"]}
    return {"huse_beats_baseline_on_val": not worse, "worse_modes": worse}


def confusion_png(probs: np.ndarray, y: np.ndarray, labels: list[str], path: Path) -> None:
    """Row-normalised confusion matrix of the fused predictions, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    cm = np.zeros((n, n))
    np.add.at(cm, (y, probs.argmax(1)), 1)
    cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    short = [l.split("<")[-1] for l in labels]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 1.0 + 0.5 * n))
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), short, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), short, fontsize=8)
    for i in range(n):
        for j in range(n):
            if cm[i, j] >= 0.005:
                ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white" if cm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted (fused)")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_run(run: str | Path) -> tuple[HUSE, dict[str, Any]]:
    """Rebuild the trained torch model of a run directory (for export and parity checks)."""
    run = Path(run)
    cfg_path = run / "config.json"
    if not (cfg_path.is_file() and (run / "model.safetensors").is_file()):
        raise HuseError(f"{run} is not a finished training run (config.json / model.safetensors missing); "
                        "train one with `huse-train --out RUN`")
    config = json.loads(cfg_path.read_text())
    mc = HuseConfig(**config["model"])
    model = build_model(mc, load_pretrained=False)
    model.load_state_dict(load_file(str(run / "model.safetensors")), strict=True)
    return model.eval(), config
