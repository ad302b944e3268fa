"""The review page in a real browser: headless Chromium driven by Selenium (slow lane).

Screenshots are kept under the test's tmp folder (and, with STACKCAT_SCREENSHOTS=DIR, copied there).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from PIL import Image

from serve_fixtures import toy_predictor
from serve_process import free_port

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PREDICTIONS = ("sku,category,probability,review,top5_categories,top5_probabilities\n"
               'a,class 1,0.55,review,"[""class 1"", ""class 2"", ""class 0""]","[0.55, 0.3, 0.1]"\n'
               'b,class 2,0.6,review,"[""class 2"", ""class 0""]","[0.6, 0.3]"\n'
               'c,class 3,0.7,review,"[""class 3"", ""class 1""]","[0.7, 0.2]"\n')


@pytest.fixture
def site(tmp_path):
    import uvicorn

    from stackcat.serve import create_app

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (220, 120, 0)).save(images / "a.jpg")
    products = tmp_path / "products.csv"
    pd.DataFrame({"sku": ["a", "b", "c"], "name": ["w1 orange tee", "w2 jeans", "w3 cap"],
                  "colour": ["orange", "blue", ""], "photo": ["images/a.jpg", "", ""]}).to_csv(products, index=False)
    app = create_app(toy_predictor(), corrections=tmp_path / "c.sqlite", products=products,
                     image_roots=[images])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(url + "/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    driver.save_screenshot(str(path))
    if os.environ.get("STACKCAT_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["STACKCAT_SCREENSHOTS"]) / path.name)
    return path


def wait_for(condition, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("the page did not get there in time")


def test_try_a_product_then_review_a_queue_with_the_keyboard(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(site)
    wait_for(lambda: "4 categories" in browser.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "field-name").send_keys("w2 n7 denim")
    browser.find_element(By.ID, "categorize").click()
    rows = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "table.prediction tbody tr"))
    assert len(rows) == 4 and rows[0].find_element(By.CSS_SELECTOR, ".category").text == "class 2"
    assert screenshot(browser, tmp_path, "try-a-product").stat().st_size > 0

    browser.find_element(By.ID, "tab-review").click()
    queue_file = tmp_path / "predictions.csv"
    queue_file.write_text(PREDICTIONS)
    browser.find_element(By.ID, "queue-file").send_keys(str(queue_file))
    wait_for(lambda: browser.find_element(By.ID, "item-title").text == "w1 orange tee")
    photo = browser.find_element(By.ID, "item-photo")
    assert wait_for(lambda: browser.execute_script("return arguments[0].naturalWidth", photo)) == 64
    screenshot(browser, tmp_path, "review-queue")

    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("2")  # product a: the second candidate
    wait_for(lambda: browser.find_element(By.ID, "item-title").text == "w2 jeans")
    body.send_keys("a")  # product b: accept the proposal
    wait_for(lambda: browser.find_element(By.ID, "item-title").text == "w3 cap")
    body.send_keys("/")  # product c: search the tree
    picker = browser.switch_to.active_element
    assert picker.get_attribute("id") == "picker"
    picker.send_keys("class 0")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#picker-list li"))
    picker.send_keys(Keys.ENTER)
    wait_for(lambda: "c → class 0" in browser.find_element(By.ID, "saved").text)
    screenshot(browser, tmp_path, "review-decided")

    exported = httpx.get(site + "/v1/corrections.csv").text.splitlines()
    assert exported == ["id,label", "a,class 2", "b,class 2", "c,class 0"]
    # reopening the queue shows the decisions
    browser.find_element(By.ID, "queue-file").send_keys(str(queue_file))
    wait_for(lambda: "decided: class 2" in browser.find_element(By.ID, "decided").text)
