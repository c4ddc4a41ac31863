"""d2mae view: the page opens from disk in a real browser (headless Chromium) with no console error, shows every
image of the run, filters narrow it to the right count, an image's blur search marks t* where the OBS table puts it,
and the restorations it shows are the model's own at each level."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from d2mae.commands.main import main
from d2mae.data.dataset import ImageDataset
from d2mae.data.phantom import generate_phantoms
from d2mae.io.artifacts import load_pretrained, save_pretrained
from d2mae.method.model_config import ModelConfig
from d2mae.method.models import DeblurMAE
from d2mae.view.images import restorations
from tests.conftest import TINY

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CPU = ["--device", "cpu", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two fine-tuning runs (D²MAE with OBS, and MAE-like without) over the same phantoms, and their pages."""
    root = tmp_path_factory.mktemp("view")
    generate_phantoms(root / "ph", n=36, size=40, seed=5)
    torch.manual_seed(0)
    save_pretrained(DeblurMAE(ModelConfig(**TINY)), root / "pre")
    common = ["finetune", "--pretrained", str(root / "pre"), "--labels", str(root / "ph" / "labels.csv"),
              "--protocol", "split:2:1:1", "--epochs", "1", "--batch-size", "8", "--warmup-epochs", "0", *CPU]
    assert main([*common, "--out", str(root / "d2mae")]) == 0
    assert main([*common, "--obs", "none", "--drop-path", "0.3", "--out", str(root / "mae")]) == 0  # same folds
    assert main(["view", str(root / "d2mae"), "--out", str(root / "page"), "--device", "cpu", "--no-progress"]) == 0
    assert main(["view", str(root / "d2mae"), str(root / "mae"), "--out", str(root / "both"), "--device", "cpu",
                 "--no-progress"]) == 0
    return {"root": root, "run": root / "d2mae", "other": root / "mae", "page": root / "page", "both": root / "both",
            "pre": root / "pre"}


def _test_rows(run: Path) -> list[dict[str, str]]:
    return [r for r in csv.DictReader((run / "predictions.csv").open()) if r["split"] == "test"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through its own driver (Debian's chromium and chromium-driver; .ci/run installs them)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM and DRIVER):
        if os.environ.get("D2MAE_REQUIRE_BROWSER"):
            pytest.fail("chromium and chromedriver are required here (apt-get install chromium chromium-driver)")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900", "--allow-file-access-from-files"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _load(browser, page: Path):
    from selenium.webdriver.common.by import By

    browser.get(page.joinpath("index.html").as_uri())
    cards = browser.find_elements(By.CSS_SELECTOR, "#grid .card")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    return cards, errors


def _select(browser, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, element_id)).select_by_value(value)


def test_the_page_opens_from_disk_with_no_error_and_shows_every_image_of_the_run(runs, browser) -> None:
    cards, errors = _load(browser, runs["page"])
    assert errors == [] and not browser.find_element("tag name", "body").get_attribute("data-errors")
    assert len(cards) == len(_test_rows(runs["run"])) > 0
    assert browser.execute_script("return window.location.protocol") == "file:"


def test_a_filter_narrows_the_grid_to_the_count_the_run_gives(runs, browser) -> None:
    from selenium.webdriver.common.by import By

    rows = _test_rows(runs["run"])
    wrong = sum(r["label"] != r["pred"] for r in rows)
    classes = json.loads((runs["run"] / "run.json").read_text())["classes"]
    _load(browser, runs["page"])
    _select(browser, "f-correct", "wrong")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid .card")) == wrong
    _select(browser, "f-correct", "")
    _select(browser, "f-truth", classes[1])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid .card")) == sum(r["label_name"] == classes[1]
                                                                              for r in rows)


def test_an_images_blur_search_marks_t_star_where_the_obs_table_puts_it(runs, browser) -> None:
    """The curve's points are the OBS table's losses; its marker is at t* of the table, the lowest point."""
    from selenium.webdriver.common.by import By

    table = {r["path"]: r for r in csv.DictReader((runs["run"] / "obs" / "obs.csv").open())}
    levels = json.loads((runs["run"] / "obs" / "obs.json").read_text())["levels"]
    cards, _ = _load(browser, runs["page"])
    data = browser.execute_script("return window.D2MAE_VIEW.items")
    for card in cards[:3]:
        item = data[int(card.get_attribute("data-k"))]
        card.click()
        marker = browser.find_element(By.CSS_SELECTOR, "#detail svg.curve circle.t-star")
        want = table[item["path"]]
        assert float(marker.get_attribute("data-t")) == float(want["t_star"])
        points = [tuple(map(float, p.split(","))) for p in
                  browser.find_element(By.CSS_SELECTOR, "#detail svg polyline").get_attribute("points").split()]
        losses = [float(want[f"loss_t{t}"]) for t in levels]
        assert item["losses"] == pytest.approx(losses)
        lowest = max(points, key=lambda p: p[1])  # SVG y grows downwards: the lowest loss
        assert float(marker.get_attribute("cx")) == pytest.approx(lowest[0])
        assert browser.find_element(By.CSS_SELECTOR, "#detail img.strip").get_attribute("naturalWidth") != "0"
        browser.find_element(By.ID, "close").click()


def test_two_runs_side_by_side_and_the_images_they_disagree_on(runs, browser) -> None:
    from selenium.webdriver.common.by import By

    a = {r["path"]: r["pred"] for r in _test_rows(runs["run"])}
    b = {r["path"]: r["pred"] for r in _test_rows(runs["other"])}
    cards, errors = _load(browser, runs["both"])
    assert errors == [] and len(cards) == len(a)
    _select(browser, "f-agree", "disagree")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid .card")) == sum(a[p] != b[p] for p in a)
    _select(browser, "f-agree", "")
    browser.find_elements(By.CSS_SELECTOR, "#grid .card")[0].click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#d-runs .run")) == 2


def test_the_restoration_shown_at_a_level_is_the_models_own_at_that_level(runs) -> None:
    """The strip's restorations (batched over images and levels) equal DeblurMAE.restore of one image at one level,
    and their losses are the OBS table's (its 6 significant digits) and the search's own computation."""
    mae = load_pretrained(runs["pre"])
    table = list(csv.DictReader((runs["run"] / "obs" / "obs.csv").open()))[:4]
    levels = json.loads((runs["run"] / "obs" / "obs.json").read_text())["levels"]
    cfg = mae.config
    data = ImageDataset([r["path"] for r in table], cfg.img_size, cfg.in_chans, augment="none")
    x = torch.stack([data[i][0] for i in range(len(table))])
    blurred, restored, losses = restorations(mae, x, levels, torch.device("cpu"), rows=5)
    with torch.no_grad():
        for i, row in enumerate(table):
            for j, t in enumerate(levels):
                one, loss = mae.eval().restore(x[i:i + 1], torch.tensor([float(t)]))
                assert torch.allclose(restored[i, j], one[0], atol=1e-5)
                assert float(losses[i, j]) == pytest.approx(float(loss), rel=1e-5)
                assert float(losses[i, j]) == pytest.approx(float(row[f"loss_t{t}"]), rel=1e-4)
                assert float(mae.deblur_loss(x[i:i + 1], torch.tensor([float(t)]))) == pytest.approx(float(loss),
                                                                                                  rel=1e-6)
    assert np.isfinite(blurred.numpy()).all()


def test_a_folder_that_holds_no_run_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "x").mkdir()
    assert main(["view", str(tmp_path / "x"), "--out", str(tmp_path / "page")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no images d2mae can show" in err
