"""Headless Chromium on the built site: a local HTTP server for `_site/` and a Selenium driver that records the
browser console. Used by `tests/test_docs.py` and by `python tools/docs_browser.py --screenshots` (which writes the
committed screenshots in `nbs/docs_screenshots/`). Needs Debian's `chromium` and `chromium-driver` packages."""
from __future__ import annotations
import argparse, contextlib, functools, http.server, shutil, threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE, SHOTS = ROOT/"_site", ROOT/"nbs"/"docs_screenshots"

def chromium_paths() -> tuple[str, str]|None:
    "(browser, driver) executables, or None when either is missing."
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass

@contextlib.contextmanager
def serve(folder:Path=SITE):
    "Serve `folder` on a free local port; yields its base URL."
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True); thread.start()
    try: yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally: server.shutdown(); server.server_close()

def driver(width:int=1280, height:int=900):
    "A headless Chromium driven by Selenium, logging every console message."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    paths = chromium_paths()
    if paths is None: raise RuntimeError("chromium and chromedriver not found: apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(paths[1]), options=opts)

def load(drv, url:str, timeout:float=30):
    "Open `url` and wait until the page and its images have loaded."
    from selenium.webdriver.support.ui import WebDriverWait
    drv.get(url)
    WebDriverWait(drv, timeout).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))

def screenshots(pages=(("front.png", "index.html"), ("lesson_04_loss.png", "lessons/04_loss.html"))):
    "Write the committed screenshots of the front page and one lesson."
    SHOTS.mkdir(parents=True, exist_ok=True)
    with serve() as base:
        drv = driver()
        try:
            for name, page in pages:
                load(drv, base + page); drv.save_screenshot(str(SHOTS/name)); print("wrote", SHOTS/name)
        finally: drv.quit()

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--screenshots", action="store_true", help="write nbs/docs_screenshots/ from the built _site/")
    if p.parse_args().screenshots: screenshots()
