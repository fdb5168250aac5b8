"""`huse-train`: a thin click layer over huse.train."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from huse.runtime.cli import run_cli
from huse.train.baselines import CV_FOLDS
from huse.train.config import FINAL_FITS, KFOLD_MAX_ROWS, HuseConfig, TrainConfig

# Every default below is read from the configs (one copy of each); they import neither torch nor scikit-learn.


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--data", "data", type=click.Path(), multiple=True,
              help="Catalog CSV, JSONL or Parquet: image,name,classes[,product_id,split] (a Parquet image column may hold "
                   "the photos themselves). Repeat it to train on several catalogs as one, e.g. yours and the "
                   "corrections `huse review export` wrote.")
@click.option("--dataset", type=click.Choice(["fashion-products", "fashion-products-open"]),
              help="A built-in dataset instead of --data (-open: val/test titles use words never seen in training).")
@click.option("--images", type=click.Path(file_okay=False), multiple=True,
              help="Folder image paths resolve against (default: the catalog's folder); with several --data, once for "
                   "all of them or once per --data, in the same order.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory, e.g. runs/NAME.")
@click.option("--backbone", default=HuseConfig.backbone, help="Image backbone: efficientnet_lite0, mobilenet_v2, vgg16 or tiny (tests).")
@click.option("--backbone-weights", type=click.Path(dir_okay=False), help="Weights file for backbones that ship none (mobilenet_v2, vgg16).")
@click.option("--image-size", default=str(HuseConfig.image_size), metavar="N|auto",
              help="Square input size of the image graph; auto: from the training photos' median size (64-224).")
@click.option("--fine-tune", is_flag=True,
              help="Train the backbone too (slow on CPU: use --device cuda; features are not cached).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=TrainConfig.device,
              help="Where torch trains: cuda needs a CUDA build of torch and an NVIDIA GPU.")
@click.option("--text-encoder", type=click.Choice(["auto", "cnn", "minilm"]), default="auto",
              help="Word CNN trained from scratch, or pretrained frozen MiniLM; auto: MiniLM when more than 10% of the "
                   "val titles' words never occur in training titles (open vocabulary), else the word CNN.")
@click.option("--arch", type=click.Choice(["compact", "paper"]), default="compact",
              help="Tower sizes: compact (one 512-wide image layer, a linear text projection, dropout 0.5) or the "
                   "paper's (image 5x512, text 2x512, dropout 0.15); README, 'Model quality'.")
@click.option("--embed-dim", default=HuseConfig.embed_dim, help="Dimension D of the universal embedding.")
@click.option("--epochs", type=int, help="Exactly this many epochs (default: a budget of max(2,000 steps, 10 epochs) "
                                          "with early stopping on val loss, multi-label: val mAP; the best epoch is kept).")
@click.option("--patience", default=TrainConfig.patience,
              help="Steps (at least 3 epochs) without a better val loss (multi-label: val mAP) before "
                   "stopping; 0: never.")
@click.option("--batch-size", default=TrainConfig.batch_size)
@click.option("--lr", default=TrainConfig.lr)
@click.option("--weight-decay", default=TrainConfig.weight_decay,
              help="AdamW's decoupled weight decay of the towers and the shared layer.")
@click.option("--alpha", default=TrainConfig.alpha, help="Classification loss weight.")
@click.option("--beta", default=TrainConfig.beta, help="Semantic-graph loss weight.")
@click.option("--gamma", default=TrainConfig.gamma, help="Cross-modal gap loss weight.")
@click.option("--delta", default=TrainConfig.delta, help="Instance-level contrastive (InfoNCE) weight between image and "
                                                         "title embeddings, for finding products; 0: the paper's losses only.")
@click.option("--margin", "zeta", default=TrainConfig.margin, help="Semantic-graph margin zeta.")
@click.option("--class-distance", type=click.Choice(["hierarchy", "minilm"]), default=TrainConfig.class_distance,
              help="Where A_ij comes from.")
@click.option("--class-name-init", is_flag=True, default=TrainConfig.class_name_init, show_default=False,
              help="Start each class's row of the shared layer at the text tower's embedding of its path's words "
                   "(a CLIP-style prior from the class names).")
@click.option("--class-name-prior", default=TrainConfig.class_name_prior,
              help="Weight of a loss pulling each class's row towards its name's embedding; 0: none.")
@click.option("--image-views", default=TrainConfig.image_views,
              help="Random crops of each training photo through the frozen backbone (cached; each step trains on one "
                   "of them or the photo); 0: the photo only.")
@click.option("--multi-label", is_flag=True, help="A sigmoid per class and per-class thresholds, even if no product lists "
                                                "several classes (a catalog whose 'classes' hold 'a<b|c<d' is multi-label without it).")
@click.option("--multi-label-head", type=click.Choice(["sigmoid", "softmax"]), default=HuseConfig.label_head,
              help="Multi-label catalogs: a sigmoid per class, or a softmax trained on the multi-hot target "
                   "spread over the product's classes.")
@click.option("--multi-label-loss", type=click.Choice(["asl", "bce"]), default=HuseConfig.label_loss,
              help="Multi-label catalogs, sigmoid head: the asymmetric loss (Ridnik et al. 2021; better on both multi-label "
                   "catalogs measured) or plain binary cross-entropy.")
@click.option("--final-fit", type=click.Choice(list(FINAL_FITS)), default=TrainConfig.final_fit,
              help="Rows the shipped model is trained on, once epochs, fusion weight and temperatures are chosen on val and "
                   "test is reported: train (the held-out model itself), train+val (a fresh model refitted on both with "
                   "those settings), all (test too: read the report first). Under --cv-folds the shipped model is "
                   "refitted on train+val at least.")
@click.option("--cv-folds", "cv_folds", metavar="K|auto", default="auto" if TrainConfig.cv_folds is None else str(TrainConfig.cv_folds),
              help="Choose the epochs, the fusion weight and the temperatures by K-fold cross-validation by product "
                   "over train+val instead of on val alone, then refit the shipped model on train+val (all with "
                   f"--final-fit all); 0: never; auto: {CV_FOLDS} folds below {KFOLD_MAX_ROWS:,} train+val rows, else "
                   "none. K+1 more trainings.")
@click.option("--skip-bad-rows", is_flag=True, help="Skip and count bad catalog rows instead of stopping at the first.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out.")
@click.option("--seed", default=TrainConfig.seed)
@click.option("--train-size", type=click.IntRange(min=1), help="fashion-products: products in train (default: all 55,000).")
@click.option("--val-size", default=5000, type=click.IntRange(min=1), help="fashion-products: products in val.")
@click.option("--test-size", type=click.IntRange(min=1), help="fashion-products: products in test (default: all 10,000).")
@click.option("--fmnist-dir", type=click.Path(file_okay=False), help="Folder with the Fashion-MNIST .gz files.")
def main(**o) -> None:
    """Train a HUSE model on a catalog or a built-in dataset into a run directory."""
    run_cli(lambda: _train(o))


def _train(o: dict) -> None:
    from huse.runtime.errors import HuseError
    from huse.train.data import load_builtin, load_catalog_dataset
    from huse.train.trainer import Trainer

    if bool(o["data"]) == bool(o["dataset"]):
        raise HuseError("pass --data CATALOG (repeatable) or --dataset NAME, not both")
    # The settings are checked (by the configs) before the catalog is read, so a typo fails at once.
    mc = HuseConfig(num_classes=0, backbone=o["backbone"], image_size=_image_size(o["image_size"]), freeze_backbone=not o["fine_tune"],
                    embed_dim=o["embed_dim"], text_encoder=o["text_encoder"], arch=o["arch"],
                    multi_label=o["multi_label"], label_head=o["multi_label_head"], label_loss=o["multi_label_loss"])
    tc = TrainConfig(epochs=o["epochs"], patience=o["patience"], batch_size=o["batch_size"], lr=o["lr"],
                     weight_decay=o["weight_decay"], alpha=o["alpha"], beta=o["beta"], gamma=o["gamma"], delta=o["delta"],
                     margin=o["zeta"], class_distance=o["class_distance"], class_name_init=o["class_name_init"],
                     class_name_prior=o["class_name_prior"], image_views=o["image_views"], final_fit=o["final_fit"],
                     cv_folds=_cv_folds(o["cv_folds"]), seed=o["seed"], device=o["device"])
    if o["dataset"]:
        ds = load_builtin(o["dataset"], fmnist_dir=o["fmnist_dir"], train_size=o["train_size"], val_size=o["val_size"],
                          test_size=o["test_size"], seed=o["seed"])
    else:
        images = o["images"][0] if len(o["images"]) == 1 else list(o["images"]) or None
        ds = load_catalog_dataset(list(o["data"]), images, skip_bad_rows=o["skip_bad_rows"], seed=o["seed"])
    click.echo(f"data: {ds.split_sizes()} (split by product); skipped rows: {len(ds.skipped)}")
    if ds.replaced:
        click.echo(f"  {ds.replaced} row(s) of a later --data catalog give new classes to a photo an earlier one holds "
                   "(review corrections): the photo trains under the later catalog's classes, in its first split")
    if ds.moved_to_train:
        click.echo(f"  moved into train: {len(ds.moved_to_train)} product(s) whose class had no other product there "
                   "(a class that only val or test rows carry is never learned)")
    for s in ds.skipped[:10]:
        click.echo(f"  skipped {s['catalog'] + ', ' if 'catalog' in s else ''}row {s['row']}: {s['reason']}")
    untrained = ds.classes_without_training_rows()
    if untrained:  # trained on anyway: the other classes are still worth a model, but the user should know
        shown = ", ".join(f"{c!r} ({n} rows)" for c, n in list(untrained.items())[:5])
        click.echo(f"WARNING: {len(untrained)} class(es) have rows only in val or test, none in train, so the model "
                   f"never learns them: {shown}{', ...' if len(untrained) > 5 else ''}. Move some of their products "
                   "into train (or drop the split column to split by product).")
    apart = ds.classes_spelled_apart()
    if apart:  # trained as written: case may matter to someone, but most often it is one class typed two ways
        shown = "; ".join(" / ".join(f"{c!r} ({n} rows)" for c, n in g.items()) for g in apart[:5])
        click.echo(f"WARNING: {len(apart)} class name(s) are written in more than one way (case, spaces, '-' or '_'), and "
                   f"each spelling is trained as a class of its own: {shown}{'; ...' if len(apart) > 5 else ''}. If they "
                   "are one class, write it one way in the catalog.")
    try:
        metrics = Trainer(ds, o["out"], mc, tc, backbone_weights=o["backbone_weights"], resume=o["resume"]).fit()
    except KeyboardInterrupt:  # Ctrl+C: say how to go on (not click's bare "Aborted!")
        saved = (Path(o["out"]) / "state.json").is_file()
        click.echo("\ninterrupted: " + ("the last checkpoint is kept; run the same command with --resume to go on "
                                        "from it" if saved else "no checkpoint was written yet; run it again"), err=True)
        sys.exit(130)
    click.echo(format_metrics(metrics))
    click.echo(f"run written to {o['out']} (metrics.json, confusion_matrix.png, model.safetensors)")


def _image_size(value: str) -> int | str:
    """--image-size: 'auto', else a whole number of pixels."""
    from huse.runtime.errors import HuseError

    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise HuseError(f"--image-size {value!r} is not a size; pass a number of pixels such as 64 or 224, or auto") from None


def _cv_folds(value: str) -> int | None:
    """--cv-folds: 'auto' -> None, else a whole number."""
    from huse.runtime.errors import HuseError

    if value.strip().lower() == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise HuseError(f"--cv-folds {value!r} is not a number of folds; pass 0 (never), 2 or more, or auto") from None


def format_metrics(metrics: dict) -> str:
    """HUSE beside the logistic-regression baselines (split x mode: tuned, and scikit-learn's defaults), calibration,
    and a plain verdict against the tuned one."""
    if metrics.get("task") == "multi-label":
        return _format_multilabel(metrics)
    lines = [f"{'split':5} {'mode':6} {'HUSE top1':>9} {'LR tuned':>9} {'LR C=1':>7} {'top5':>7}  per-level top1", "-" * 72]
    for split in ("val", "test"):
        for mode, r in metrics.get(split, {}).items():
            base, plain = metrics["baseline"][split][mode]["top1"], metrics["baseline_defaults"][split][mode]["top1"]
            levels = " ".join(f"L{k}={v:.3f}" for k, v in r["levels"].items())
            lines.append(f"{split:5} {mode:6} {r['top1']:9.4f} {base:9.4f} {plain:7.4f} {r['top5']:7.4f}  {levels}")
    bs = metrics["baseline_settings"]
    lines.append(f"LR tuned: {bs['folds']}-fold cross-validation by product on {bs['cv_rows']} of {bs['train_rows']} "
                 f"training rows: image C={bs['image']['C']}, text C={bs['text']['C']}, fused image weight "
                 f"{bs['fused']['image_weight']}" + _fold_spread(bs))
    cal = metrics["calibration"]
    cov = cal["coverage"]["fused"]
    cv_lines, chosen = _cv_report(metrics.get("cv"))
    lines += cv_lines
    lines.append(f"fusion image weight (chosen {chosen}): {metrics['fusion_image_weight']}; best epoch "
                 f"{metrics['best_epoch']} of {metrics['epochs_run']}; text encoder {metrics['text_encoder']['chosen']} "
                 f"({100 * metrics['text_encoder']['val_unseen_word_rate']:.0f}% of val title words unseen in training)")
    lines.append(f"fused calibration ({cal['split']}): ECE {cal['ece_before']['fused']:.3f} -> {cal['ece_after']['fused']:.3f} "
                 f"(temperature {cal['temperature']['fused']}); accuracy at coverage "
                 + ", ".join(f"{100 * float(c):.0f}%: {v['accuracy']:.3f} (p>={v['threshold']:.2f})" for c, v in cov.items()))
    lines += _shipped_lines(metrics["final_fit"], "", lambda r: f"{r['top1']:.4f}")
    worse = metrics["verdict"]["worse_modes"]
    if worse:
        lines.append("WARNING: HUSE is worse than a tuned logistic regression on the same features on val in "
                     + ", ".join(f"{m} ({v['huse']:.4f} < {v['baseline']:.4f})" for m, v in worse.items())
                     + f" ({metrics['split_sizes']['val']} val items: small val splits are noisy). Try: more data per class"
                     + ("; --text-encoder minilm for titles with new words" if metrics["text_encoder"]["chosen"] == "cnn" else "")
                     + "; or serve the baseline's modality alone.")
    else:
        lines.append(_no_worse_line(metrics, "top1", "HUSE", "the tuned logistic-regression baseline"))
    return "\n".join(lines)


def _no_worse_line(metrics: dict, metric: str, huse: str, baseline: str) -> str:
    """The verdict when no mode is below the baseline on val: "beats" only where every mode is above it, and
    what the test split says where it disagrees (a small split's verdict can flip on the next one)."""
    val, base = metrics["val"], metrics["baseline"]["val"]
    ties = [m for m in val if val[m][metric] == base[m][metric]]
    line = (f"{huse} matches or beats {baseline} on val in every mode (equal in {', '.join(ties)})." if ties
            else f"{huse} beats {baseline} on val in every mode.")
    test, base_test = metrics.get("test", {}), metrics["baseline"].get("test", {})
    below = [f"{m} ({test[m][metric]:.4f} < {base_test[m][metric]:.4f})" for m in test
             if m in base_test and test[m][metric] < base_test[m][metric]]
    if below:
        line += (f" On test it is below in {', '.join(below)} ({metrics['split_sizes']['test']} test items: small "
                 "splits are noisy, and the settings were not chosen on test).")
    return line


def _cv_report(cv: dict | None) -> tuple[list[str], str]:
    """The report's k-fold line (when folds ran, or "auto" decided against them), and how the settings were chosen."""
    if not cv:
        return [], "on val"
    if not cv["folds"]:
        return [f"k-fold cross-validation not used ({cv['reason']})"], "on val"
    return [_cv_line(cv)], f"by {cv['folds']}-fold CV"


def _shipped_lines(ff: dict, figures: str, figure) -> list[str]:
    """'shipped model: refitted on ...' with its test `figure(report)` beside the LR's on the same rows; none
    when the shipped model is the held-out one."""
    if ff["rows"] == "train":
        return []
    held = (f"; on test{figures}: " + ", ".join(f"{m} {figure(r)} (LR tuned on the same rows {figure(ff['baseline_test'][m])})"
                                                for m, r in ff["test"].items()) if "test" in ff else "")
    return [f"shipped model: refitted on {' + '.join(ff['splits'])} ({ff['items']} items, {ff['epochs']} epochs){held}; "
            "the figures above are the held-out model's"]


def _cv_line(cv: dict) -> str:
    """The k-fold choices and their spread across folds, in one line."""
    folds = cv["per_fold"]
    metric = "top1" if "top1" in cv else "map"  # multi-label: mAP

    def span(mode: str) -> str:
        v = [f[f"val_{metric}"][mode] for f in folds]
        return f"{mode} {min(v):.2f}-{max(v):.2f}"

    return (f"settings by {cv['folds']}-fold cross-validation by product on {cv['rows']} train+val rows "
            f"({cv['products']} products; {cv['reason']}): {cv['epochs']} epochs (median of the folds' best: "
            f"{', '.join(str(f['best_epoch']) for f in folds)}), fusion image weight {cv['image_weight']} on the pooled "
            f"out-of-fold predictions (each fold alone: {', '.join(str(f['image_weight']) for f in folds)}); "
            f"out-of-fold {'top-1' if metric == 'top1' else 'mAP'} image {cv[metric]['image']:.4f}, text "
            f"{cv[metric]['text']:.4f}, fused {cv[metric]['fused']:.4f}; across folds: {span('image')}, {span('text')}, "
            f"{span('fused')}")


def _fold_spread(settings: dict) -> str:
    """'; top-1 across folds: image 0.61-0.70, ...' from the baseline's settings (runs before it was recorded: '')."""
    if "fold_top1" not in settings["image"]:
        return ""
    return "; top-1 across folds: " + ", ".join(
        f"{m} {min(settings[m]['fold_top1']):.2f}-{max(settings[m]['fold_top1']):.2f}" for m in ("image", "text", "fused"))


def _format_multilabel(metrics: dict) -> str:
    """format_metrics for a multi-label run: micro/macro-F1, mAP, subset accuracy beside the one-vs-rest baseline."""
    from huse.train.multilabel import format_table

    lines = format_table(metrics)
    cv_lines, chosen = _cv_report(metrics.get("cv"))
    lines += cv_lines
    c = metrics["baseline_info"]["C"]
    lines.append(f"fusion image weight (chosen {chosen}, micro-F1): {metrics['fusion_image_weight']}; thresholds from "
                 f"{metrics.get('thresholds_from', 'val')}; best epoch "
                 f"{metrics['best_epoch']} of {metrics['epochs_run']}; text encoder {metrics['text_encoder']['chosen']}; "
                 f"labels per product (val) {metrics['labels_per_product'].get('val', 0):.2f}; baseline: one-vs-rest "
                 f"logistic regression, C by product-grouped CV (image {c['image']}, text {c['text']})")
    lines += _shipped_lines(metrics.get("final_fit", {"rows": "train"}), " (micro-F1 / mAP)",
                            lambda r: f"{r['micro_f1']:.4f} / {r['map']:.4f}")
    worse = metrics["verdict"]["worse_modes"]
    if worse:
        lines.append("WARNING: HUSE's micro-F1 is below the one-vs-rest logistic regression's on the same features on val in "
                     + ", ".join(f"{m} ({v['huse']:.3f} < {v['baseline']:.3f})" for m, v in worse.items())
                     + f" ({metrics['split_sizes']['val']} val items: small val splits are noisy). Try: more data per class; "
                       "or serve the baseline's modality alone.")
    else:
        lines.append(_no_worse_line(metrics, "micro_f1", "HUSE's micro-F1", "the one-vs-rest logistic-regression "
                                    "baseline's"))
    return "\n".join(lines)


@click.group()
def data() -> None:
    """Built-in datasets, and a catalog from a folder of photos."""


@data.command("export")
@click.argument("name", type=click.Choice(["fashion-products", "fashion-products-open"]))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--limit", type=click.IntRange(min=1), help="Write only the first N products of each split.")
@click.option("--fmnist-dir", type=click.Path(file_okay=False), help="Folder with the Fashion-MNIST .gz files.")
def export_data(name: str, out: str, limit: int | None, fmnist_dir: str | None) -> None:
    """Write a built-in dataset as catalog.csv + PNG images (real photos, generated titles)."""
    def body():
        from huse.train.fashion import export_catalog

        path = export_catalog(out, fmnist_dir, limit=limit, open_vocab=name == "fashion-products-open")
        click.echo(f"wrote {path}")
    run_cli(body)


@data.command("catalog")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="The catalog CSV to write (default: FOLDER/catalog.csv); "
              "never an existing file.")
@click.option("--classes-from-folders", is_flag=True,
              help="Each photo's folders below FOLDER are its class path, one level per folder (shoes/boots/x.jpg -> "
                   "shoes<boots), as torchvision's ImageFolder lays classes out.")
@click.option("--names-from-file-names", is_flag=True,
              help="A photo without a .txt title beside it is named by its file name's words "
                   "(black-leather_boot.jpg -> 'black leather boot').")
def catalog_from_folder(folder: str, out: str | None, classes_from_folders: bool, names_from_file_names: bool) -> None:
    """Write a catalog CSV with a row per photo under FOLDER (every subfolder), titled by a .txt beside each photo.

    Then: huse classify BUNDLE --data FOLDER/catalog.csv, huse index build, or (with titles and classes)
    huse-train --data FOLDER/catalog.csv.
    """
    def body():
        from huse.runtime.photo_folder import summary, write_folder_catalog

        click.echo(summary(write_folder_catalog(folder, out, classes_from_folders=classes_from_folders,
                                                names_from_file_names=names_from_file_names)))
    run_cli(body)


if __name__ == "__main__":
    main()
