"""The README's screenshots of the review page, on the embedded demo: docs/serve-*.png.

Writes the demo table with its photo paths and the predictions of its first
``--rows`` products (``stackcat predict``), starts ``stackcat serve`` on
127.0.0.1 with that products table, and drives headless Chromium through
"try a product" and the review queue.

    timeout 600 python experiments/screenshot_page.py artifacts/demo --out docs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from stackcat.demo import load_demo

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,1000")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--port", type=int, default=8732)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stackcat-screens-"))
    raw, _ = load_demo()
    products = work / "products.csv"
    raw.to_csv(products, index=False)
    table = work / "to_review.csv"
    raw.head(args.rows).drop(columns="articleType").to_csv(table, index=False)
    predictions = work / "predictions.csv"
    subprocess.run([sys.executable, "-m", "stackcat.cli", "predict", args.model, str(table), "--out",
                    str(predictions)], check=True)
    server = subprocess.Popen([sys.executable, "-m", "stackcat.cli", "serve", args.model, "--port", str(args.port),
                               "--products", str(products), "--corrections", str(work / "c.sqlite")])
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        shoot(url, predictions, args.out)
    finally:
        server.terminate()
        server.wait(30)


def shoot(url: str, predictions: Path, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*FLAGS, f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.implicitly_wait(10)
    try:
        driver.get(url)
        time.sleep(1)
        driver.find_element(By.ID, "field-productDisplayName").send_keys("Puma Men Black Running Shoes")
        driver.find_element(By.ID, "field-gender").send_keys("Men")
        driver.find_element(By.ID, "categorize").click()
        driver.find_element(By.CSS_SELECTOR, "table.prediction")
        driver.save_screenshot(str(out / "serve-try.png"))
        driver.find_element(By.ID, "tab-review").click()
        driver.find_element(By.ID, "queue-file").send_keys(str(predictions))
        driver.find_element(By.CSS_SELECTOR, "#candidates li")
        time.sleep(1)
        driver.find_element(By.ID, "picker").send_keys("shoe")
        time.sleep(0.5)
        driver.save_screenshot(str(out / "serve-review.png"))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
