"""Single-label runs are bit-identical before and after multi-label support (issue 22).

    OMP_NUM_THREADS=1 python benchmarks/experiments/single_label_unchanged.py --base 96a04f1 \\
        --dataset fashion-products --train-size 2000 --val-size 500 --test-size 500 --epochs 3
    (session 14, after multi-label k-fold: --base fb173ba, --out .../single_label_unchanged-s14.json; and
    --catalog $PWD/data/phosphor-icons/catalog.csv --cv-folds 5, --out .../single_label_unchanged-s14-kfold.json)

Trains the same single-label data with the code of `--base` (unpacked with `git archive` and put
first on the import path) and with this checkout, each in its own process, and compares the sha256
of model.safetensors, of metrics.json and of config.json (without its creation time). CPU training
is deterministic, so equal digests mean the model, its metrics and its config did not change.
Writes benchmarks/results/cpu-2core/multilabel/single_label_unchanged.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TRAIN = r"""
import hashlib, json, sys
from pathlib import Path
import huse.train.trainer as T
from huse.train.data import load_builtin, load_catalog_dataset
from huse.train.model import HuseConfig
from huse.train.trainer import TrainConfig, Trainer
a = json.loads(sys.argv[1])
ds = (load_builtin(a["dataset"], train_size=a["train_size"], val_size=a["val_size"], test_size=a["test_size"])
      if a["dataset"] else load_catalog_dataset(a["catalog"]))
out = Path(a["out"])
mc = HuseConfig(num_classes=0, backbone=a["backbone"], text_encoder="cnn", arch="compact")
# The k-fold default for small catalogs (session 13) is another recipe: by default the held-out model is what this
# compares; --cv-folds K compares the k-fold path (its folds, refit and metrics) between two commits that have it.
folds = {"cv_folds": a["cv_folds"]} if "cv_folds" in TrainConfig.__dataclass_fields__ else {}
Trainer(ds, out, mc, TrainConfig(epochs=a["epochs"], **folds)).fit(progress=False)
cfg = json.loads((out / "config.json").read_text()); cfg.pop("created")
h = lambda b: hashlib.sha256(b).hexdigest()
print(json.dumps({"code": T.__file__, "config_json": cfg, "model": h((out / "model.safetensors").read_bytes()),
                  "metrics": h((out / "metrics.json").read_bytes()), "config": h(json.dumps(cfg, sort_keys=True).encode()),
                  "test_fused_top1": json.loads((out / "metrics.json").read_text())["test"]["fused"]["top1"]}))
"""


def _base_tree(commit: str, tmp: Path) -> Path:
    """`commit`'s train/runtime/export/benchmarks folders as an importable `huse` package under tmp."""
    src = tmp / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = tmp / "pkg" / "huse"
    pkg.mkdir(parents=True)
    for d in ("train", "runtime", "export", "benchmarks"):
        (pkg / d).symlink_to(src / d)
    return tmp / "pkg"


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON objects (one level into nested objects)."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict) and not prefix:
            out += _differences(x, y, f"{k}.")
        elif x != y or (k in a) != (k in b):
            out.append(prefix + k)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="The commit before multi-label support.")
    p.add_argument("--dataset", default=None)
    p.add_argument("--catalog", default=None)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--cv-folds", type=int, default=0, help="K: compare runs with K-fold settings and the refit.")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu-2core/multilabel/single_label_unchanged.json"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_path = _base_tree(a.base, tmp)
        results = {}
        for name, path in (("base", str(base_path)), ("this", "")):
            args = {**vars(a), "out": str(tmp / f"run-{name}")}
            env = {**os.environ, "PYTHONPATH": path} if path else {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            r = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(args)], capture_output=True, text=True,
                               env=env, cwd=tmp)
            if r.returncode:
                sys.exit(f"{name} training failed:\n{r.stderr[-3000:]}")
            results[name] = json.loads(r.stdout.strip().splitlines()[-1])
    same = {k: results["base"][k] == results["this"][k] for k in ("model", "metrics", "config")}
    # Where config.json differs, which entries: a new option's field is told from a changed value.
    same["config_differences"] = _differences(*(results[n].pop("config_json") for n in ("base", "this")))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"base": a.base, "this": head, "settings": {k: v for k, v in vars(a).items() if k != "out"},
              "identical": same, "runs": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({"identical": same, "test_fused_top1": results["this"]["test_fused_top1"]}))


if __name__ == "__main__":
    main()
