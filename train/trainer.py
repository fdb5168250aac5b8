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

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from huse.runtime.bundle import package_versions, write_json_atomic
from huse.runtime.errors import HuseError
from huse.runtime.hierarchy import Hierarchy
from huse.runtime.preprocess import ImageSpec, load_image
from huse.runtime.tokenizer import WordTokenizer, normalise_title
from huse.train.backbones import backbone_info
from huse.train.data import Dataset
from huse.train.losses import huse_loss
from huse.train.model import HUSE, HuseConfig, build_model


@dataclass
class TrainConfig:
    epochs: int = 12
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    alpha: float = 1.0  # classification loss weight
    beta: float = 1.0  # semantic-graph loss weight
    gamma: float = 0.2  # cross-modal gap loss weight (large values pull the towers to one mode)
    margin: float = 0.7  # zeta: hierarchy distances are 0 (same), 1/3 (siblings), 2/3, 1
    class_distance: str = "hierarchy"  # or "minilm": cosine distance of class-name embeddings
    seed: int = 0
    feature_batch: int = 128  # images per backbone call during feature extraction


# ----------------------------------------------------------------------------------------
# Small utilities


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write safetensors so that a killed run never leaves a broken file (write + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def _probs(logits: torch.Tensor) -> np.ndarray:
    return logits.softmax(-1).numpy()


def accuracy_report(probs: np.ndarray, y: np.ndarray, hierarchy: Hierarchy) -> dict[str, Any]:
    """top-1/top-5 on leaves and top-1 per hierarchy level."""
    top5 = np.argsort(-probs, axis=1)[:, :5]
    report = {"top1": float((top5[:, 0] == y).mean()), "top5": float((top5 == y[:, None]).any(axis=1).mean()), "levels": {}}
    for k in range(1, hierarchy.depth + 1):
        m = hierarchy.levels[k - 1][1]
        pred, true = (probs @ m).argmax(1), m[y].argmax(1)
        report["levels"][str(k)] = float((pred == true).mean())
    return report


def best_fusion_weight(p_img: np.ndarray, p_txt: np.ndarray, y: np.ndarray) -> float:
    """The image weight in [0, 1] (step 0.05) with the best fused top-1 on validation; ties go to 0.5."""
    grid = np.round(np.linspace(0, 1, 21), 2)
    acc = [((w * p_img + (1 - w) * p_txt).argmax(1) == y).mean() for w in grid]
    best = max(acc)
    return float(min((w for w, a in zip(grid, acc) if a == best), key=lambda w: abs(w - 0.5)))


# ----------------------------------------------------------------------------------------
# Features


def _cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def extract_image_features(model: HUSE, ds: Dataset, spec: ImageSpec, cache: Path, batch: int) -> torch.Tensor:
    """Backbone features of every image, computed once and cached (frozen backbone)."""
    key = _cache_key({"backbone": model.cfg.backbone, "spec": spec.to_dict(), "source": ds.source,
                      "ids": hashlib.sha256("\n".join(ds.product_ids).encode()).hexdigest(), "n": len(ds.images)})
    path = cache / f"image-features-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    feats = []
    # channels_last: ~25% faster depthwise/pointwise convolutions on CPU, same numbers.
    backbone = model.backbone.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for s in tqdm(range(0, len(ds.images), batch), desc="image features", unit="batch", mininterval=2):
            x = torch.from_numpy(np.stack([load_image(img, spec) for img in ds.images[s:s + batch]]))
            feats.append(backbone(x.contiguous(memory_format=torch.channels_last)))
    model.backbone.to(memory_format=torch.contiguous_format)
    out = torch.cat(feats)
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
    feats = []
    with torch.no_grad():
        for s in tqdm(range(0, len(ids), batch), desc="text features", unit="batch", mininterval=2):
            feats.append(model.text_features(ids[s:s + batch], inputs["attention_mask"][s:s + batch]))
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
    """

    def __init__(self, ds: Dataset, out: str | Path, model_cfg: HuseConfig, train_cfg: TrainConfig,
                 backbone_weights: str | None = None, resume: bool = False):
        self.ds, self.out, self.tc = ds, Path(out), train_cfg
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(train_cfg.seed)
        np.random.seed(train_cfg.seed)
        self.labels = sorted(set(ds.classes))
        self.hierarchy = Hierarchy(self.labels)
        self.y = torch.tensor([self.labels.index(c) for c in ds.classes])
        info = backbone_info(model_cfg.backbone)
        self.spec = ImageSpec(size=(model_cfg.image_size, model_cfg.image_size), mean=info.mean, std=info.std)
        self.split = {s: torch.from_numpy(ds.indices(s)) for s in ("train", "val", "test")}
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
        self.model = build_model(model_cfg, backbone_weights)
        self.class_dist = torch.from_numpy(class_distances(self.hierarchy, train_cfg.class_distance))
        self.text_inputs = encode_titles(self.tokenizer, ds.titles)
        self.epoch = 0
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        self.history: list[dict[str, float]] = []
        if resume:
            self._load_checkpoint()
        elif (self.out / "state.json").exists():
            raise HuseError(f"{self.out} already holds a run; pass --resume to continue it or choose a new --out")

    # -- features -----------------------------------------------------------------------
    def _prepare_features(self) -> None:
        cache = self.out / "cache"
        self.frozen = self.mc.freeze_backbone
        if self.frozen:
            self.image_feats = extract_image_features(self.model, self.ds, self.spec, cache, self.tc.feature_batch)
            self.model.feature_norm.set_stats(self.image_feats[self.split["train"]])
        self.text_feats = (extract_text_features(self.model, self.text_inputs, cache)
                           if self.mc.text_encoder == "minilm" else None)

    def _image_emb(self, idx: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            f = self.image_feats[idx]
        else:  # fine-tuning: the backbone runs on every batch
            f = self.model.image_features(torch.from_numpy(np.stack([load_image(self.ds.images[i], self.spec) for i in idx.tolist()])))
        return self.model.embed_image_features(f)

    def _text_emb(self, idx: torch.Tensor) -> torch.Tensor:
        if self.text_feats is not None:
            return self.model.embed_text_features(self.text_feats[idx])
        return self.model.embed_text(self.text_inputs["input_ids"][idx], None)

    # -- checkpoints ----------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        skip = ("backbone.",) if self.mc.freeze_backbone else ()
        skip += ("text_encoder.",) if self.mc.text_encoder == "minilm" else ()
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith(skip)}

    def _save_checkpoint(self) -> None:
        save_safetensors_atomic(self._trainable_state(), self.out / "checkpoint.safetensors")
        opt = self.optimizer.state_dict()
        flat = {f"{pid}.{name}": (t if torch.is_tensor(t) else torch.tensor(t))
                for pid, st in opt["state"].items() for name, t in st.items()}
        save_safetensors_atomic(flat, self.out / "optimizer.safetensors")
        # state.json last: it is what marks the checkpoint as complete.
        write_json_atomic(self.out / "state.json", {"epoch": self.epoch, "history": self.history,
                                                    "param_groups": opt["param_groups"]})

    def _load_checkpoint(self) -> None:
        state_path = self.out / "state.json"
        if not state_path.is_file():
            raise HuseError(f"--resume: no checkpoint in {self.out} (state.json missing); start without --resume")
        state = json.loads(state_path.read_text())
        missing, unexpected = self.model.load_state_dict(load_file(str(self.out / "checkpoint.safetensors")), strict=False)
        if unexpected or any(k for k in missing if k in self._trainable_state()):
            raise HuseError(f"--resume: checkpoint in {self.out} does not fit this model (was it trained with other options?)")
        flat = load_file(str(self.out / "optimizer.safetensors"))
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, t in flat.items():
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = t
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        self.epoch, self.history = state["epoch"], state["history"]

    # -- loop ---------------------------------------------------------------------------
    def _lr(self, step: int, total: int) -> float:
        return self.tc.lr * 0.5 * (1 + math.cos(math.pi * step / total))  # cosine decay

    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Train for the configured epochs (continuing after a resume), then evaluate and save."""
        self._prepare_features()
        train_idx = self.split["train"]
        steps_per_epoch = math.ceil(len(train_idx) / self.tc.batch_size)
        total = steps_per_epoch * self.tc.epochs
        gen = torch.Generator().manual_seed(self.tc.seed)
        for _ in range(self.epoch):  # keep the shuffle sequence identical after a resume
            torch.randperm(len(train_idx), generator=gen)
        bar = tqdm(total=total, initial=self.epoch * steps_per_epoch, desc="training", unit="step", disable=not progress, mininterval=2)
        while self.epoch < self.tc.epochs:
            self.model.train()
            self.model.backbone.train(not self.mc.freeze_backbone)
            perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
            sums: dict[str, float] = {}
            for s in range(0, len(perm), self.tc.batch_size):
                idx = perm[s:s + self.tc.batch_size]
                for g in self.optimizer.param_groups:
                    g["lr"] = self._lr(self.epoch * steps_per_epoch + s // self.tc.batch_size, total)
                ie, te = self._image_emb(idx), self._text_emb(idx)
                loss, parts = huse_loss(ie, te, self.model.classifier(ie), self.model.classifier(te), self.y[idx],
                                        self.class_dist, alpha=self.tc.alpha, beta=self.tc.beta, gamma=self.tc.gamma,
                                        margin=self.tc.margin)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v / steps_per_epoch
                bar.update(1)
            self.epoch += 1
            val = self.predict("val")
            sums.update(epoch=self.epoch, val_image_top1=accuracy_report(val["image"], val["y"], self.hierarchy)["top1"],
                        val_text_top1=accuracy_report(val["text"], val["y"], self.hierarchy)["top1"])
            self.history.append(sums)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", val_img=f"{sums['val_image_top1']:.3f}", val_txt=f"{sums['val_text_top1']:.3f}")
            self._save_checkpoint()
        bar.close()
        return self.finish()

    @torch.no_grad()
    def predict(self, split: str) -> dict[str, np.ndarray]:
        """Image and text probabilities and labels of a split (eval mode)."""
        self.model.eval()
        idx = self.split[split]
        img, txt = [], []
        for s in range(0, len(idx), 1024):
            b = idx[s:s + 1024]
            img.append(_probs(self.model.classifier(self._image_emb(b))))
            txt.append(_probs(self.model.classifier(self._text_emb(b))))
        return {"image": np.concatenate(img), "text": np.concatenate(txt), "y": self.y[idx].numpy()}

    def finish(self) -> dict[str, Any]:
        """Choose the fusion weight on val, write metrics, the confusion matrix and the final model."""
        val, test = self.predict("val"), self.predict("test") if len(self.split["test"]) else None
        w = best_fusion_weight(val["image"], val["text"], val["y"])
        metrics: dict[str, Any] = {"fusion_image_weight": w, "split_sizes": self.ds.split_sizes(),
                                   "skipped_rows": len(self.ds.skipped), "history": self.history}
        for name, pr in (("val", val), ("test", test)):
            if pr is None:
                continue
            fused = w * pr["image"] + (1 - w) * pr["text"]
            metrics[name] = {mode: accuracy_report(p, pr["y"], self.hierarchy)
                             for mode, p in (("image", pr["image"]), ("text", pr["text"]), ("fused", fused))}
        final = test or val
        confusion_png(w * final["image"] + (1 - w) * final["text"], final["y"], self.labels, self.out / "confusion_matrix.png")
        save_safetensors_atomic(self.model.state_dict(), self.out / "model.safetensors")
        self.tokenizer.save(self.out / ("vocab.json" if self.mc.text_encoder == "cnn" else "tokenizer.json"))
        write_json_atomic(self.out / "config.json", {
            "model": self.mc.to_dict(), "train": asdict(self.tc), "labels": self.labels, "data": self.ds.source,
            "skipped": self.ds.skipped, "preprocessing": self.spec.to_dict(),
            "tokenizer": self.tokenizer.spec("vocab.json" if self.mc.text_encoder == "cnn" else "tokenizer.json"),
            "fusion": {"image_weight": w}, "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_json_atomic(self.out / "metrics.json", metrics)
        return metrics


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
