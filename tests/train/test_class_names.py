"""The class-name prior: the shared layer starts (and can be kept) where the class names point.

MiniLM is real (about 0.4 s to load); the backbone is the tiny test CNN. A few seconds in all.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra (torch)")
pytest.importorskip("tokenizers", reason="needs the [train] extra (tokenizers)")

from click.testing import CliRunner  # noqa: E402

from huse.train.data import load_catalog_dataset  # noqa: E402
from huse.train.model import HuseConfig, class_name_title  # noqa: E402
from huse.train.trainer import TrainConfig, Trainer  # noqa: E402


def _trainer(catalog, out, encoder: str, **train) -> Trainer:
    return Trainer(load_catalog_dataset(catalog), out,
                   HuseConfig(num_classes=0, backbone="tiny", image_size=32, embed_dim=64, hidden=64, max_len=8,
                              text_encoder=encoder),
                   TrainConfig(epochs=3, batch_size=32, lr=3e-3, cv_folds=0, **train))


def _answers(tr: Trainer, titles: list[str]) -> list[str]:
    """The text tower's top-1 class for each title, as the trainer's model stands."""
    inputs = tr.tokenizer.inputs(titles)
    tr.model.eval()
    with torch.no_grad():
        emb = tr.model.embed_text(torch.from_numpy(inputs["input_ids"]),
                                  torch.from_numpy(inputs["attention_mask"]) if "attention_mask" in inputs else None)
        return [tr.labels[i] for i in tr.model.classifier(emb).argmax(1).tolist()]


def test_class_name_title_reads_the_path_words_once():
    assert class_name_title("clothing<tops<t-shirts") == "clothing tops t-shirts"
    assert class_name_title("arrows<arrows") == "arrows"  # phosphor-icons repeats a level
    assert class_name_title("files / folders") == "files / folders"


def test_untrained_model_answers_by_the_class_names(tiny_catalog, tmp_path):
    # Titles the catalog never uses, each closest in meaning to one class's name: before any training step the
    # text classifier can only get them right through the names.
    titles = ["a graphic t-shirt", "leather ankle boots", "a tote bag", "an oxford shirt"]
    want = ["clothing<tops<t-shirts", "shoes<boots<ankle boots", "bags<handbags<handbags", "clothing<tops<shirts"]
    prior = _trainer(tiny_catalog, tmp_path / "prior", "minilm", class_name_init=True)
    assert prior.class_names["applied"]
    assert _answers(prior, titles) == want
    plain = _trainer(tiny_catalog, tmp_path / "plain", "minilm")
    assert sum(a == w for a, w in zip(_answers(plain, titles), want)) < len(want)  # random rows: not by the names


def test_prior_weight_keeps_the_rows_near_the_names(tiny_catalog, tmp_path):
    def name_cosine(weight: float) -> float:
        tr = _trainer(tiny_catalog, tmp_path / f"w{weight}", "minilm", class_name_init=True, class_name_prior=weight)
        metrics = tr.fit(progress=False)
        plan = metrics["class_names"]
        assert {k: plan[k] for k in ("applied", "init", "weight")} == {"applied": True, "init": True, "weight": weight}
        assert 0.0 <= plan["train_top1_by_names"] <= 1.0  # what the names alone say of the training titles
        tr.model.eval()
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(tr.model.classifier.linear.weight, tr._name_emb()).mean())

    free, held = name_cosine(0.0), name_cosine(5.0)
    assert held > free and held > 0.9, (free, held)


def test_word_cnn_without_the_class_words_skips_the_prior_and_says_why(tiny_catalog, tmp_path):
    # The tiny catalog's titles never say "bags" or "handbags": the word CNN cannot read that class's name.
    tr = _trainer(tiny_catalog, tmp_path / "cnn", "cnn", class_name_init=True, class_name_prior=1.0)
    metrics = tr.fit(progress=False)
    plan = metrics["class_names"]
    assert plan["applied"] is False and "bags handbags" in plan["reason"] and 0 < plan["known_word_share"] < 1
    plain = _trainer(tiny_catalog, tmp_path / "plain", "cnn")
    plain.fit(progress=False)
    assert torch.equal(tr.model.classifier.linear.weight, plain.model.classifier.linear.weight)  # skipped: as without


def test_cli_options_reach_the_run(tiny_catalog, tmp_path):
    from huse.train.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["--data", str(tiny_catalog), "--out", str(out), "--backbone", "tiny", "--image-size", "32",
                                  "--epochs", "1", "--batch-size", "32", "--embed-dim", "32", "--text-encoder", "minilm",
                                  "--class-name-init", "--class-name-prior", "0.5", "--cv-folds", "0"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["class_name_init"] is True and cfg["train"]["class_name_prior"] == 0.5
    assert json.loads((out / "metrics.json").read_text())["class_names"]["applied"] is True
