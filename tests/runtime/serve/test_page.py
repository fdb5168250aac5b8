"""The web page in a real browser (headless Chromium + Selenium) against a real `huse serve`.

A person's path through it: upload or drop a photo, type a title, read the class path and the nearest
products, filter, click a result; review rows with the mouse and with the keyboard alone, reload,
export the corrections; the server killed (SIGKILL) right after a decision was acknowledged; and
the first paint and next-item times with 10,000 rows to review, measured in the browser.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import signal
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from huse.runtime import Classifier, Index
from huse.runtime.cli import main
from tests.runtime.serve.page_fixtures import big_catalog, classify, screenshot

WAIT = 30  # seconds a page may take to show something on this shared 2-core machine
SCORE_TOL = 1e-5  # fp32 through the server vs the Python API


def wait(browser, condition, timeout: float = WAIT, what: str = "the page"):
    """Poll `condition` until it holds. An element found while the page reloads (signing in reloads it) goes stale
    between finding it and reading it: that poll counts as not yet, not as a failure. Chromium reports some such
    reads not as a stale element but as an "unknown error: ... Node with given id does not belong to the document"
    (a CI run on a busy host hit it): the same case, so also not yet."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def poll(d):
        try:
            return condition(d)
        except WebDriverException as e:
            if "does not belong to the document" in str(e):
                return False
            raise

    return WebDriverWait(browser, timeout, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                         ).until(poll, message=f"{what} did not happen")


def by_id(browser, id_: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, id_)


def css(browser, selector: str):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def open_page(browser, url: str) -> None:
    """A fresh navigation (never a same-document hash change), so timings start at zero."""
    browser.get("about:blank")
    browser.get(url)


def keys(browser, *ks) -> None:
    """Keys to whatever has the focus, as a person types them."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).send_keys(*ks).perform()


def hits(browser) -> list[dict]:
    """The results shown, read in one script (the list may be redrawn between two WebDriver calls)."""
    return browser.execute_script("""return [...document.querySelectorAll('#hits button')].map((b) => (
        {item: Number(b.dataset.item), classes: b.dataset.classes, score: Number(b.dataset.score)}));""")


def run_query(browser, before: list[dict] | None = None) -> list[dict]:
    """Press the button, wait until the results change, return them."""
    by_id(browser, "go").click()
    wait(browser, lambda d: css(d, "#hits button") and hits(d) != before
         and not by_id(d, "search-status").text.startswith("Working"), what="a search")
    assert not by_id(browser, "search-status").text, by_id(browser, "search-status").text
    return hits(browser)


def progress(browser) -> dict:
    text = browser.execute_script("return document.getElementById('progress-text').textContent")
    # "3 done · 9 left (accepted 1, corrected 1, skipped 1)"
    done, left = text.split(" done · ")
    return {"done": int(done.replace(",", "")), "left": int(left.split(" left")[0].replace(",", ""))}


def current_row(browser) -> int:
    meta = browser.execute_script("return document.getElementById('review-meta').textContent")
    return int(meta.split(" · ")[0].removeprefix("row "))


def shown_score(score: float) -> str:
    """How the page writes a score: two decimals, and never 1.00 for less than 1."""
    return "0.99+" if 0.995 <= score < 1 else f"{score:.2f}"


def journal_entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def queue_rows(preds_path: Path) -> list[int]:
    """The rows the review must show, in the order it must show them (least confident first)."""
    rows = [json.loads(line) for line in preds_path.read_text().splitlines()]
    return [p["row"] for p in sorted((p for p in rows if p.get("needs_review")), key=lambda p: (p["score"], p["row"]))]


# -- search and classify ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def search_server(tiny_bundle, flat_index, tiny_catalog):
    from tests.runtime.serve.conftest import ServerProcess

    s = ServerProcess(tiny_bundle, "--index", str(flat_index), "--images", str(tiny_catalog.parent),
                      "--min-confidence", "1.0")
    yield s
    s.stop()
    s.log.close()


def test_search_and_classify_from_a_photo_and_a_title(browser, search_server, tiny_bundle, flat_index, tiny_catalog):
    rows = list(csv.DictReader(open(tiny_catalog)))
    photo, title = tiny_catalog.parent / rows[95]["image"], "navy boots"
    open_page(browser, search_server.url + "/")
    by_id(browser, "photo").send_keys(str(photo))
    wait(browser, lambda d: by_id(d, "query-preview").is_displayed(), what="the photo preview")
    by_id(browser, "title").send_keys(title)
    shown = run_query(browser)

    with Classifier(tiny_bundle, backend="onnxruntime", threads=1) as clf:
        want = clf.classify(images=[photo.read_bytes()], titles=[title])[0]
    path = [(li.get_attribute("data-label"), float(li.get_attribute("data-score")))
            for li in css(browser, "#class-path li")]
    assert [p for p, _ in path] == [p["label"] for p in want["path"]] and len(path) == 3
    np.testing.assert_allclose([s for _, s in path], [p["score"] for p in want["path"]], atol=SCORE_TOL)
    top = [li.get_attribute("data-label") for li in css(browser, "#topk li")]
    assert top == [t["label"] for t in want["top_k"]]
    leaf = want["path"][-1]
    assert by_id(browser, "class-path").text.split("\n")[-2:] == [f"level 3 {leaf['label'].split('<')[-1]}",
                                                                   shown_score(leaf["score"])]
    # --min-confidence 1.0 on the server: anything short of certain needs review
    assert by_id(browser, "needs-review").is_displayed() == (want["top_k"][0]["score"] < 1.0)

    with Index.open(flat_index) as idx:
        expected = idx.search(texts=[title], images=[photo.read_bytes()], k=12, target="image")[0]
    assert [h["item"] for h in shown] == [h.item for h in expected]
    images = css(browser, "#hits img")
    assert len(images) == 12
    wait(browser, lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                                for i in images), what="every thumbnail loading")
    names = [e.text for e in css(browser, "#hits .hit-name")]
    assert names == [h.name for h in expected]
    assert screenshot(browser, "search", height=1250).stat().st_size > 10_000

    # a filtered search over products: only that subtree comes back
    by_id(browser, "filter").send_keys("bags")
    from selenium.webdriver.support.ui import Select

    Select(by_id(browser, "target")).select_by_value("product")
    filtered = run_query(browser, shown)
    assert filtered and all(h["classes"].startswith("bags<") for h in filtered)


def test_on_a_phone_sized_window_the_form_fits_its_column(browser, search_server):
    """The search form and its results fit a 390 px wide window (a phone held upright): no sideways scrolling, no
    control wider than the form's column (the space list was), and the photo picker says its state in full (it
    was cut to "N...en" at every width)."""
    browser.set_window_size(390, 844)
    try:
        open_page(browser, search_server.url + "/")
        by_id(browser, "title").send_keys("navy boots")
        run_query(browser)
        width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width
        inside = browser.execute_script(  # the widest control of the form's column against the column's own box
            "const q = document.querySelector('#query-form .fields'); return [Math.max(...[...q.querySelectorAll('*')]"
            ".map((e) => e.getBoundingClientRect().right)), q.getBoundingClientRect().right]")
        assert inside[0] <= inside[1] + 0.5, inside
        assert by_id(browser, "photo").size["width"] >= 200
    finally:
        browser.set_window_size(1200, 900)


def test_clicking_a_result_searches_from_it(browser, search_server, tiny_catalog):
    from selenium.webdriver.support.ui import Select

    rows = list(csv.DictReader(open(tiny_catalog)))
    open_page(browser, search_server.url + "/")
    by_id(browser, "photo").send_keys(str(tiny_catalog.parent / rows[10]["image"]))
    Select(by_id(browser, "space")).select_by_value("visual")  # this same product: its own photo comes first
    first = run_query(browser)
    assert first[0]["score"] == pytest.approx(1.0, abs=1e-4)
    clicked = first[3]
    css(browser, "#hits button")[3].click()
    after = wait(browser, lambda d: hits(d) if hits(d) and hits(d) != first else None, what="a search from the result")
    assert after[0]["item"] == clicked["item"] and after[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert by_id(browser, "query-preview").is_displayed()


def test_results_show_the_photos_the_index_keeps(browser, tiny_bundle, kept_photos_index):
    """An index of a Parquet catalog's photos, served without --images: every result with a photo shows it,
    the three without say so, and clicking either kind searches from it."""
    from selenium.webdriver.support.ui import Select

    from tests.runtime.serve.conftest import ServerProcess

    index, rows, photos = kept_photos_index
    s = ServerProcess(tiny_bundle, "--index", str(index))
    try:
        open_page(browser, s.url + "/")
        by_id(browser, "title").send_keys("tee")
        Select(by_id(browser, "target")).select_by_value("text")
        by_id(browser, "k").clear()
        by_id(browser, "k").send_keys("30")
        shown = run_query(browser)
        assert sorted(h["item"] for h in shown) == list(range(30))
        wait(browser, lambda d: len(css(d, "#hits .nophoto")) == 3 and all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
            for i in css(d, "#hits img")), what="27 thumbnails and 3 'no photo'")
        buttons = css(browser, "#hits button")
        without = [b.get_attribute("data-item") for b in buttons if b.find_elements("css selector", ".nophoto")]
        assert sorted(map(int, without)) == [0, 1, 2]

        with_photo = next(i for i, h in enumerate(shown) if h["item"] >= 3)
        buttons[with_photo].click()
        wait(browser, lambda d: by_id(d, "query-preview").is_displayed(), what="the kept photo as the query")
        after = wait(browser, lambda d: hits(d) if hits(d) and hits(d) != shown else None, what="a search from it")
        none = next(i for i, h in enumerate(after) if h["item"] < 3)
        css(browser, "#hits button")[none].click()  # no photo: its title alone, and no error
        wait(browser, lambda d: not by_id(d, "query-preview").is_displayed() and hits(d) != after,
             what="a search from the title alone")
        assert not by_id(browser, "search-status").text
        assert by_id(browser, "title").get_attribute("value") == rows[after[none]["item"]]["name"]
    finally:
        s.stop()
        s.log.close()


def test_behind_a_token_the_page_signs_in_once(browser, tiny_bundle, kept_photos_index, tmp_path):
    """--token-file: the page asks for the token, says so when it is wrong, and once signed in searches and
    shows photos as on loopback (the session cookie goes with every request, images included)."""
    from tests.runtime.serve.conftest import ServerProcess

    (tmp_path / "token").write_text("s3cret-token-of-enough-length")
    s = ServerProcess(tiny_bundle, "--index", str(kept_photos_index[0]), "--token-file", str(tmp_path / "token"))
    try:
        browser.delete_all_cookies()
        open_page(browser, s.url + "/")
        wait(browser, lambda d: by_id(d, "view-signin").is_displayed(), what="the sign-in form")
        assert not by_id(browser, "view-search").is_displayed()
        by_id(browser, "token").send_keys("wrong")
        by_id(browser, "signin").click()
        wait(browser, lambda d: "wrong token" in by_id(d, "signin-status").text, what="'wrong token'")
        by_id(browser, "token").clear()
        by_id(browser, "token").send_keys("s3cret-token-of-enough-length")
        by_id(browser, "signin").click()
        wait(browser, lambda d: by_id(d, "view-search").is_displayed(), what="the search after signing in")
        by_id(browser, "title").send_keys("tee")
        assert run_query(browser)
        wait(browser, lambda d: css(d, "#hits img") and all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
            for i in css(d, "#hits img")), what="the thumbnails loading")
    finally:
        browser.delete_all_cookies()
        s.stop()
        s.log.close()


def test_a_dropped_photo_is_the_query(browser, search_server, tiny_bundle, tiny_catalog):
    photo = tiny_catalog.parent / list(csv.DictReader(open(tiny_catalog)))[40]["image"]
    open_page(browser, search_server.url + "/")
    wait(browser, lambda d: d.execute_script("return document.querySelectorAll('#prefixes option').length > 0"))
    # a file dragged from the desktop: a real DataTransfer holding the PNG's bytes, dropped on the zone
    browser.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
        """, base64.b64encode(photo.read_bytes()).decode())
    wait(browser, lambda d: by_id(d, "query-preview").is_displayed(), what="the dropped photo's preview")
    run_query(browser)
    with Classifier(tiny_bundle, backend="onnxruntime", threads=1) as clf:
        want = clf.classify(images=[photo.read_bytes()])[0]
    assert [li.get_attribute("data-label") for li in css(browser, "#topk li")] == [t["label"] for t in want["top_k"]]
    assert by_id(browser, "pred-mode").text == "(image)"
    assert not by_id(browser, "labels").is_displayed()  # a single-label bundle has no label set


def test_a_multi_label_bundle_shows_its_label_set(browser, tiny_multi_bundle, tiny_multi_catalog):
    from tests.runtime.serve.conftest import ServerProcess

    titles = [r["name"] for r in csv.DictReader(open(tiny_multi_catalog, newline=""))]
    with Classifier(tiny_multi_bundle, backend="onnxruntime", threads=1) as clf:
        title, want = next((t, r) for t, r in zip(titles, clf.classify(titles=titles)) if len(r["labels"]) > 1)
    s = ServerProcess(tiny_multi_bundle)
    try:
        open_page(browser, s.url + "/")
        wait(browser, lambda d: d.execute_script("return document.querySelectorAll('#prefixes option').length > 0"))
        by_id(browser, "title").send_keys(title)
        by_id(browser, "go").click()
        wait(browser, lambda d: css(d, "#labels li"), what="the label set")
        shown = [(li.get_attribute("data-label"), float(li.get_attribute("data-score")))
                 for li in css(browser, "#labels li")]
        assert [label for label, _ in shown] == [x["label"] for x in want["labels"]]
        np.testing.assert_allclose([score for _, score in shown], [x["score"] for x in want["labels"]], atol=SCORE_TOL)
        assert by_id(browser, "h-labels").is_displayed() and by_id(browser, "pred-mode").text == "(text)"
        assert by_id(browser, "labels-note").get_attribute("textContent") == "(each class at or above its threshold)"
    finally:
        s.stop()
        s.log.close()


def test_every_control_has_a_label(browser, search_server):
    open_page(browser, search_server.url + "/")
    wait(browser, lambda d: d.execute_script("return document.querySelectorAll('#prefixes option').length > 0"))
    unlabelled = browser.execute_script("""
        return [...document.querySelectorAll('input, select, button, textarea, progress')].filter((c) => {
          const byFor = c.id && document.querySelector(`label[for="${c.id}"]`);
          return !(byFor || c.getAttribute('aria-label') || c.getAttribute('aria-labelledby') ||
                   (c.tagName === 'BUTTON' && c.textContent.trim()));
        }).map((c) => c.outerHTML);""")
    assert unlabelled == []


def test_the_page_needs_nothing_from_the_internet():
    static = Path(__import__("huse.runtime.serve.app", fromlist=["STATIC"]).STATIC)
    for f in ("index.html", "app.js", "app.css"):
        text = (static / f).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f


# -- the review queue --------------------------------------------------------------------------------
@pytest.fixture
def review_server(start_server, preds, review_catalog):
    """start(journal) -> a server reviewing `preds` with that journal; every one is stopped afterwards."""
    return lambda journal, **kw: start_server("--review", str(preds), "--catalog", str(review_catalog),
                                              "--journal", str(journal), **kw)


def test_review_five_rows_reload_and_export(browser, review_server, preds, review_catalog, labels, tmp_path):
    journal = tmp_path / "journal.jsonl"
    server = review_server(journal)
    order = queue_rows(preds)
    open_page(browser, server.url + "/#review")
    wait(browser, lambda d: by_id(d, "card").is_displayed(), what="the first row")
    assert progress(browser) == {"done": 0, "left": len(order)}
    assert current_row(browser) == order[0]
    assert by_id(browser, "review-photo").get_attribute("naturalWidth") != "0"
    choices = [b.get_attribute("data-label") for b in css(browser, "#choices button")]
    assert len(choices) == 3

    def decided(n: int) -> None:
        wait(browser, lambda d: progress(d)["done"] == n and by_id(d, "review-status").text.startswith("Saved"),
             what=f"decision {n} saved")

    by_id(browser, "accept").click()                             # 1: accept with the mouse
    decided(1)
    second = current_row(browser)
    wanted = next(l for l in labels if l != css(browser, "#choices button")[0].get_attribute("data-label"))
    by_id(browser, "correct").send_keys(wanted.split("<")[-1])   # 2: correct through the typeahead
    wait(browser, lambda d: css(d, "#correct-list li"), what="the typeahead")
    option = next(li for li in css(browser, "#correct-list li") if li.text == wanted)
    option.click()
    decided(2)
    by_id(browser, "skip").click()                               # 3: skip
    decided(3)
    third_choice = css(browser, "#choices button")[2].get_attribute("data-label")
    fourth = current_row(browser)
    css(browser, "#choices button")[2].click()                   # 4: pick the third choice
    decided(4)
    keys(browser, "\ue007")                                      # 5: Enter accepts (the card has the focus)
    decided(5)
    assert current_row(browser) == order[5]

    entries = journal_entries(journal)
    assert [(e["row"], e["action"]) for e in entries] == [
        (order[0], "accept"), (second, "correct"), (order[2], "skip"), (fourth, "correct"), (order[4], "accept")]
    assert entries[1]["label"] == wanted and entries[3]["label"] == third_choice

    browser.refresh()                                            # progress is the server's, not the page's
    wait(browser, lambda d: by_id(d, "card").is_displayed() and progress(d)["done"] == 5, what="the reloaded review")
    assert current_row(browser) == order[5]

    out = tmp_path / "corrections.csv"
    r = CliRunner().invoke(main, ["review", "export", str(journal), "--out", str(out)])
    assert r.exit_code == 0, r.output
    got = list(csv.DictReader(open(out)))
    want_labels = {order[0]: entries[0]["label"], second: wanted, fourth: third_choice, order[4]: entries[4]["label"]}
    catalog = {i: row for i, row in enumerate(csv.DictReader(open(review_catalog)), 1)}
    assert [(g["image"], g["name"], g["classes"]) for g in got] == [
        (catalog[row]["image"], catalog[row]["name"], want_labels[row]) for row in sorted(want_labels)]


def test_review_from_the_keyboard_alone(browser, review_server, preds, labels, tmp_path):
    journal = tmp_path / "journal.jsonl"
    server = review_server(journal)
    order = queue_rows(preds)
    open_page(browser, server.url + "/#review")
    wait(browser, lambda d: by_id(d, "card").is_displayed(), what="the first row")
    active = browser.switch_to.active_element
    assert active.get_attribute("id") == "card"  # the review has the focus: no click needed

    def saved(n: int) -> None:
        wait(browser, lambda d: progress(d)["done"] == n, what=f"decision {n} saved")

    keys(browser, "\ue007")          # Enter: accept
    saved(1)
    second = css(browser, "#choices button")[1].get_attribute("data-label")
    keys(browser, "2")               # 2: the second choice
    saved(2)
    keys(browser, "/")               # /: the typeahead, arrows, Enter
    assert browser.switch_to.active_element.get_attribute("id") == "correct"
    keys(browser, "hand")
    wait(browser, lambda d: css(d, "#correct-list li"), what="the typeahead")
    matches = [li.text for li in css(browser, "#correct-list li")]
    keys(browser, "\ue015", "\ue007")  # ArrowDown, Enter: the second match (or the first again, if it is alone)
    saved(3)
    keys(browser, "s")               # s: skip; the focus came back to the card
    saved(4)
    entries = journal_entries(journal)
    assert [e["row"] for e in entries] == order[:4]
    assert [e["action"] for e in entries[:2]] == ["accept", "correct"] and entries[3]["action"] == "skip"
    assert entries[1]["label"] == second
    # the typeahead's pick: a correction, or an accept when it is the model's top-1 anyway
    assert entries[2]["label"] == matches[1 % len(matches)] and all("hand" in m for m in matches)
    assert entries[2]["action"] == ("accept" if entries[2]["label"] == entries[2]["predicted"] else "correct")


def test_review_a_multi_label_row_as_a_set(browser, start_server, tiny_multi_bundle, tiny_multi_catalog, tmp_path):
    """Keys put classes in and out of a row's set; Enter saves the set (unchanged: an accept)."""
    out = classify(tiny_multi_bundle, tiny_multi_catalog, tmp_path / "preds.jsonl", "--min-confidence", 0.8)
    journal = tmp_path / "journal.jsonl"
    server = start_server("--review", str(out), "--catalog", str(tiny_multi_catalog), "--journal", str(journal),
                          bundle=tiny_multi_bundle)
    open_page(browser, server.url + "/#review")
    wait(browser, lambda d: by_id(d, "card").is_displayed(), what="the first row")

    def shown() -> tuple[list[str], set[str]]:
        buttons = css(browser, "#choices button")
        return ([b.get_attribute("data-label") for b in buttons],
                {b.get_attribute("data-label") for b in buttons if b.get_attribute("aria-pressed") == "true"})

    def saved(n: int) -> None:
        wait(browser, lambda d: progress(d)["done"] == n, what=f"decision {n} saved")

    choices, first = shown()
    assert first and by_id(browser, "accept").text.startswith("Save these classes")
    keys(browser, "\ue007")  # Enter: the predicted set as it is
    saved(1)
    choices, predicted = shown()
    keys(browser, "2")  # the second choice in or out of the set
    toggled = predicted ^ {choices[1]}
    wait(browser, lambda d: shown()[1] == toggled, what="the second choice put in or taken out")
    # the typeahead adds one more: a class no other class's name contains, so it is the only match
    labels = json.loads((tiny_multi_bundle / "manifest.json").read_text())["labels"]
    extra = next(c for c in labels if c not in shown()[1] and not any(c in o for o in labels if o != c))
    keys(browser, "/")
    keys(browser, extra)
    wait(browser, lambda d: [li.text for li in css(d, "#correct-list li")] == [extra], what="the typeahead")
    keys(browser, "\ue007")
    wait(browser, lambda d: extra in shown()[1], what="the typed class in the set")
    keys(browser, "\ue007")  # Enter: save the set
    saved(2)
    entries = journal_entries(journal)
    assert entries[0]["action"] == "accept" and entries[0]["label"] == "|".join(sorted(first))
    assert entries[1]["action"] == "correct"
    assert entries[1]["label"] == "|".join(sorted(toggled | {extra}))


def test_an_acknowledged_decision_survives_sigkill(browser, review_server, preds, tmp_path):
    journal = tmp_path / "journal.jsonl"
    server = review_server(journal)
    order = queue_rows(preds)
    open_page(browser, server.url + "/#review")
    wait(browser, lambda d: by_id(d, "card").is_displayed(), what="the first row")
    for n in (1, 2, 3):
        keys(browser, "\ue007" if n != 2 else "s")
        # "Saved row" shows as soon as the server answers; the next row takes keys once the count moves
        # (app.js, decide), so a key pressed between the two would be dropped.
        wait(browser, lambda d: by_id(d, "review-status").text.startswith(f"Saved row {order[n - 1]}")
             and progress(d)["done"] == n, timeout=WAIT, what=f"decision {n} acknowledged")
    os.kill(server.proc.pid, signal.SIGKILL)  # right after the page said "Saved": no chance to flush anything
    server.proc.wait(10)
    assert [(e["row"], e["action"]) for e in journal_entries(journal)] == [
        (order[0], "accept"), (order[1], "skip"), (order[2], "accept")]

    again = review_server(journal)  # reopened: the review continues where it stopped
    open_page(browser, again.url + "/#review")
    wait(browser, lambda d: by_id(d, "card").is_displayed() and progress(d)["done"] == 3, what="the reopened review")
    assert current_row(browser) == order[3]


def test_first_paint_and_next_item_with_10000_rows(browser, tiny_bundle, tiny_catalog, labels, tmp_path):
    """Measured in the browser (performance API); printed, and written to $HUSE_PAGE_TIMINGS when set."""
    from tests.runtime.serve.conftest import ServerProcess

    catalog = big_catalog(tiny_catalog, tmp_path / "big", 10_000)
    out = classify(tiny_bundle, catalog, tmp_path / "preds.jsonl", "--images", tiny_catalog.parent, "--mode", "text",
                   "--min-confidence", 1.0, "--threads", 1)
    total = len(queue_rows(out))
    assert total > 9_000  # the text model is never certain of these titles
    server = ServerProcess(tiny_bundle, "--review", str(out), "--catalog", str(catalog), "--images",
                           str(tiny_catalog.parent), "--journal", str(tmp_path / "journal.jsonl"))
    try:
        open_page(browser, server.url + "/#review")
        wait(browser, lambda d: d.execute_script("return window.huseReview && window.huseReview.timings.firstItem"),
             what="the first row")
        assert progress(browser) == {"done": 0, "left": total}
        paint = browser.execute_script(
            "return performance.getEntriesByName('first-contentful-paint').map((e) => e.startTime)[0]")
        first = browser.execute_script("return window.huseReview.timings.firstItem")
        assert screenshot(browser, "review", height=700).stat().st_size > 10_000
        for n in range(1, 21):
            keys(browser, "\ue007" if n % 3 else "s")
            wait(browser, lambda d: d.execute_script("return window.huseReview.timings.nextItem.length") == n,
                 what=f"item {n + 1}")
        nexts = browser.execute_script("return window.huseReview.timings.nextItem")
    finally:
        server.stop()
        server.log.close()
    figures = {"rows": total, "first_contentful_paint_ms": round(paint, 1), "first_item_ms": round(first, 1),
               "next_item_ms": {"median": round(statistics.median(nexts), 1),
                                "p90": round(sorted(nexts)[int(0.9 * len(nexts)) - 1], 1),
                                "max": round(max(nexts), 1), "n": len(nexts)},
               "bar_ms": 200, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print("page timings:", json.dumps(figures))
    if os.environ.get("HUSE_PAGE_TIMINGS"):
        Path(os.environ["HUSE_PAGE_TIMINGS"]).write_text(json.dumps(figures, indent=2) + "\n")
    assert len(nexts) == 20
    # The bar is 200 ms (the figures printed above are what is reported); the test fails only
    # when the page is an order of magnitude off it, which load on a shared machine does not explain.
    assert figures["first_item_ms"] < 2000 and figures["next_item_ms"]["median"] < 2000, figures
