"""Real development catalogs beyond fashion-products, converted to the catalog CSV format.

    python -m huse.benchmarks.catalogs phosphor-icons data/phosphor-icons   # ~15 s each, needs npm
    python -m huse.benchmarks.catalogs tabler-icons data/tabler-icons
    python -m huse.benchmarks.catalogs mdi-icons data/mdi-icons
    python -m huse.benchmarks.catalogs mdi-icons-multi data/mdi-icons-multi

Each is an icon set from the npm registry, pinned, where every icon is a product with a real
name ("shopping-cart-simple" -> "shopping cart simple"), several "photos" (the same icon drawn
in different styles, rasterised to PNG) and a class from the authors' own taxonomy:

`phosphor-icons` (npm `@phosphor-icons/core@2.1.1`, MIT): six photos (the weights thin, light,
regular, bold, fill, duotone); a two-level class from the two taxonomies the authors assigned:
the Figma category, then the first of its `categories` ("office & editing<design").

`tabler-icons` (npm `@tabler/icons@3.52.0`, MIT): the icons drawn both outlined and filled; four
photos: the outline at the three stroke widths Tabler offers its users (1, 1.5 and 2 px on a
24 px grid) and the filled icon; a one-level class, the `category` of `icons.json` ("e-commerce").

`mdi-icons` (npm `@mdi/svg@7.4.47`, Apache-2.0): Material Design Icons that have an `-outline`
variant and exactly one tag; two photos (filled and outline); the class is that tag
("files / folders"), one level.

In each, classes with fewer than `MIN_PRODUCTS` icons are left out, and at most `MAX_PRODUCTS`
icons per class are kept (a seeded pick), so a catalog is the size of a small shop: a few hundred
products in about 30 classes. Products go wholly to train, val or test (seeded hash of the
name), so every test product and most of its name's words were never seen in training.

The packages are fetched with `npm pack` (the registry's ordinary client) into a cache folder;
SVGs are rasterised with resvg-py (`pip install resvg-py`, in the `bench` extra).

`phosphor-icons-multi`: the same products, images and split as phosphor-icons, with every one of each
icon's `categories` as its classes (multi-label, `|`-separated; README "Multi-label products").
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import click

from huse.runtime.cli import run_cli
from huse.runtime.errors import HuseError

PHOSPHOR = "@phosphor-icons/core@2.1.1"
TABLER = "@tabler/icons@3.52.0"
MDI = "@mdi/svg@7.4.47"
WEIGHTS = ("thin", "light", "regular", "bold", "fill", "duotone")
TABLER_STROKES = ("1", "1.5", "2")  # the stroke widths Tabler's site and packages offer
MIN_PRODUCTS = 8  # a class needs enough products to have some in each split
MAX_PRODUCTS = 16  # the size of a small shop, and no class dominates
RASTER = 96  # px; the model's default input is 64x64
SPLIT = (0.6, 0.15)  # train, val fractions by product; the rest is test

# The Figma categories, as the package's enum spells them (the key in its JS source -> label).
_ENTRY = re.compile(r'name: "([^"]+)",\s*pascal_name: "[^"]+",\s*(?:alias: \{[^}]*\},\s*)?'
                    r'categories: \[([^\]]*)\],\s*figma_category: a\.(\w+)')


def _fetch(spec: str, cache: Path) -> Path:
    """Unpack an npm package into `cache` (once) and return its folder."""
    folder = cache / spec.replace("/", "_").replace("@", "")
    if (folder / "package").is_dir():
        return folder / "package"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        name = subprocess.run(["npm", "pack", spec, "--silent"], cwd=folder, check=True, capture_output=True,
                              text=True).stdout.strip().splitlines()[-1]
    except (OSError, subprocess.CalledProcessError) as e:
        raise HuseError(f"could not download {spec} with `npm pack` ({e}); install Node.js/npm") from None
    with tarfile.open(folder / name) as tar:
        tar.extractall(folder, filter="data")
    return folder / "package"


def _enum(src: str, var: str) -> dict[str, str]:
    """KEY -> label of one of the bundle's string enums, e.g. `i.OFFICE = "office & editing"`."""
    m = re.search(r"\(\(i\) => \((.*?), i\)\)\(" + var + r" \|\| \{\}\)", src)
    return dict(re.findall(r'i\.(\w+) = "([^"]+)"', m.group(1)))


def _split(name: str, seed: int) -> str:
    u = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big") / 2**64
    return "train" if u < SPLIT[0] else "val" if u < SPLIT[0] + SPLIT[1] else "test"


def pick_products(icons: list[tuple[str, str]], seed: int) -> dict[str, list[str]]:
    """class -> sorted icon names: classes with at least MIN_PRODUCTS icons, at most MAX_PRODUCTS each (seeded pick).

    Args:
        icons: (name, class) of every candidate icon.
        seed: which icons a large class keeps.
    """
    sizes = Counter(c for _, c in icons)
    per_class: dict[str, list[str]] = defaultdict(list)
    for name, cls in sorted(icons, key=lambda x: hashlib.sha256(f"pick:{seed}:{x[0]}".encode()).hexdigest()):
        if sizes[cls] >= MIN_PRODUCTS and len(per_class[cls]) < MAX_PRODUCTS:
            per_class[cls].append(name)
    return {c: sorted(names) for c, names in sorted(per_class.items())}


def write_catalog(out: Path, per_class: dict[str, list[str]], views: dict[str, Any], seed: int) -> Path:
    """Rasterise each product's views and write catalog.csv (image, name, classes, product_id, split).

    Args:
        out: the catalog folder (images go to out/images).
        per_class: class -> icon names (pick_products).
        views: view name -> function(icon name) -> SVG markup of that view.
        seed: the split seed.
    Returns:
        The CSV's path.
    """
    try:
        import resvg_py
    except ImportError as e:
        raise HuseError(f"rasterising SVG needs resvg-py ({e}); pip install resvg-py") from None
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / "catalog.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "name", "classes", "product_id", "split"])
        for cls, names in per_class.items():
            for name in names:
                for view, svg in views.items():
                    rel = f"images/{name}-{view}.png"
                    png = bytes(resvg_py.svg_to_bytes(svg_string=svg(name), width=RASTER, height=RASTER))
                    (out / rel).write_bytes(png)
                    w.writerow([rel, name.replace("-", " "), cls, name, _split(name, seed)])
    return path


def phosphor_icons(out: str | Path, cache: str | Path | None = None, seed: int = 0) -> Path:
    """Write the phosphor-icons catalog (catalog.csv + images/) and return the CSV's path."""
    out = Path(out)
    pkg = _fetch(PHOSPHOR, Path(cache) if cache else out / ".cache")
    src = (pkg / "dist" / "index.mjs").read_text(encoding="utf-8")
    figma, cats = _enum(src, "a"), _enum(src, "e")
    icons = []
    for name, categories, fig in _ENTRY.findall(src):
        first = categories.split(",")[0].strip().split(".")[-1]
        icons.append((name, f"{figma[fig]}<{cats[first]}"))

    def view(weight: str):
        return lambda name: (pkg / "assets" / weight / (f"{name}.svg" if weight == "regular" else f"{name}-{weight}.svg")
                             ).read_text(encoding="utf-8")

    return write_catalog(out, pick_products(icons, seed), {w: view(w) for w in WEIGHTS}, seed)


def phosphor_icons_multi(out: str | Path, cache: str | Path | None = None, seed: int = 0) -> Path:
    """Write phosphor-icons-multi (catalog.csv + images/) and return the CSV's path.

    The same products, images and split as `phosphor_icons`, but each product lists EVERY one of its
    `categories` as a class path ("design|editor"), as the icon authors assigned them: a real
    multi-label catalog (1 to 4 categories per icon, 1.8 on average). The categories are one flat
    taxonomy (the Figma category is another, assigned once per icon), so the paths have one level.
    """
    path = phosphor_icons(out, cache, seed)
    src = (_fetch(PHOSPHOR, Path(cache) if cache else Path(out) / ".cache") / "dist" / "index.mjs").read_text(encoding="utf-8")
    cats = _enum(src, "e")
    every = {name: "|".join(sorted({cats[c.strip().split(".")[-1]] for c in categories.split(",")}))
             for name, categories, _ in _ENTRY.findall(src)}
    rows = list(csv.DictReader(open(path, newline="", encoding="utf-8")))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "classes": every[r["product_id"]]} for r in rows)
    return path


def tabler_icons(out: str | Path, cache: str | Path | None = None, seed: int = 0) -> Path:
    """Write the tabler-icons catalog (catalog.csv + images/) and return the CSV's path."""
    out = Path(out)
    pkg = _fetch(TABLER, Path(cache) if cache else out / ".cache")
    meta = json.loads((pkg / "icons.json").read_text(encoding="utf-8"))
    icons = [(name, m["category"].lower()) for name, m in meta.items()
             if m.get("category") and {"outline", "filled"} <= set(m.get("styles", {}))]

    def outline(stroke: str):
        def svg(name: str) -> str:
            text = (pkg / "icons" / "outline" / f"{name}.svg").read_text(encoding="utf-8")
            return text.replace('stroke-width="2"', f'stroke-width="{stroke}"', 1)
        return svg

    views = {f"outline-{s}": outline(s) for s in TABLER_STROKES}
    views["filled"] = lambda name: (pkg / "icons" / "filled" / f"{name}.svg").read_text(encoding="utf-8")
    return write_catalog(out, pick_products(icons, seed), views, seed)


def mdi_icons(out: str | Path, cache: str | Path | None = None, seed: int = 0) -> Path:
    """Write the mdi-icons catalog (catalog.csv + images/) and return the CSV's path."""
    out = Path(out)
    pkg = _fetch(MDI, Path(cache) if cache else out / ".cache")
    meta = {m["name"]: m for m in json.loads((pkg / "meta.json").read_text(encoding="utf-8")) if not m["deprecated"]}
    icons = [(name, m["tags"][0].lower()) for name, m in meta.items()
             if f"{name}-outline" in meta and len(m["tags"]) == 1]
    svg = lambda name: (pkg / "svg" / f"{name}.svg").read_text(encoding="utf-8")  # noqa: E731
    views = {"filled": svg, "outline": lambda name: svg(f"{name}-outline")}
    return write_catalog(out, pick_products(icons, seed), views, seed)


def mdi_icons_multi(out: str | Path, cache: str | Path | None = None, seed: int = 0) -> Path:
    """Write mdi-icons-multi (catalog.csv + images/) and return the CSV's path.

    A second real multi-label catalog: Material Design Icons that have an `-outline` variant, each
    listing EVERY one of its `tags` in meta.json as a class ("banking|shopping"), as the icon authors
    assigned them (a quarter of the icons have two or more). Products are picked as in `mdi_icons`, by
    their first tag (at most MAX_PRODUCTS per class); a tag that is not one of the picked classes is left
    out of the product's set. Icons tagged "Emoji" are left out: emoji sets are reserved for independent
    evaluation, and this keeps even emoji-like icons out of development data.
    """
    out = Path(out)
    pkg = _fetch(MDI, Path(cache) if cache else out / ".cache")
    meta = {m["name"]: m for m in json.loads((pkg / "meta.json").read_text(encoding="utf-8")) if not m["deprecated"]}
    tags = {name: [t.lower() for t in m["tags"]] for name, m in meta.items()
            if f"{name}-outline" in meta and m["tags"] and "emoji" not in (t.lower() for t in m["tags"])}
    per_class = pick_products([(name, t[0]) for name, t in tags.items()], seed)
    svg = lambda name: (pkg / "svg" / f"{name}.svg").read_text(encoding="utf-8")  # noqa: E731
    path = write_catalog(out, per_class, {"filled": svg, "outline": lambda name: svg(f"{name}-outline")}, seed)
    rows = list(csv.DictReader(open(path, newline="", encoding="utf-8")))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "classes": "|".join(sorted(t for t in set(tags[r["product_id"]]) if t in per_class))} for r in rows)
    return path


CATALOGS = {"phosphor-icons": phosphor_icons, "phosphor-icons-multi": phosphor_icons_multi,
            "tabler-icons": tabler_icons, "mdi-icons": mdi_icons, "mdi-icons-multi": mdi_icons_multi}


@click.command()
@click.argument("name", type=click.Choice(sorted(CATALOGS)))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--cache", type=click.Path(file_okay=False), help="Where downloaded packages are kept (default: OUT/.cache).")
@click.option("--seed", default=0, help="Split seed.")
def main(name: str, out: str, cache: str | None, seed: int) -> None:
    """Write a real development catalog as catalog.csv + PNG images."""
    def body():
        path = CATALOGS[name](out, cache, seed)
        rows = list(csv.DictReader(open(path, encoding="utf-8")))
        splits = Counter(r["split"] for r in rows)
        click.echo(f"wrote {path}: {len(rows)} images of {len({r['product_id'] for r in rows})} products in "
                   f"{len({p for r in rows for p in r['classes'].split('|')})} classes; images per split {dict(splits)}")
    run_cli(body)


if __name__ == "__main__":
    main()
