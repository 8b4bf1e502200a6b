"""The lessons' explorers in a real notebook: JupyterLab (from PyPI) serves a copy of lesson 04, headless Chromium runs
all its cells through JupyterLab's own Run menu, drags the clip-range slider of the clipped-objective explorer, and the
explorer's figure must change. Skipped without chromium and chromedriver, unless DDPO_REQUIRE_BROWSER=1 (as in CI).

The lesson is copied to a temporary folder first: JupyterLab saves a notebook it has run, and the committed lesson
must stay as it is."""
import json, os, secrets, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/"tools"))
import docs_browser

LESSON = "04_loss.ipynb"

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

@pytest.fixture
def lab(tmp_path):
    if docs_browser.chromium_paths() is None:
        if os.environ.get("DDPO_REQUIRE_BROWSER") == "1": pytest.fail("chromium/chromedriver missing: apt-get install chromium chromium-driver")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    work = tmp_path/"work"; work.mkdir()
    nb = json.loads((ROOT/"nbs"/LESSON).read_text())   # the copy leaves out the hidden `nbdev_export()` cell: it needs the repository
    nb["cells"] = [c for c in nb["cells"] if "nbdev_export()" not in "".join(c["source"])]
    (work/LESSON).write_text(json.dumps(nb))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",   # a private Jupyter config: no user settings leak in
           "JUPYTER_CONFIG_DIR": str(tmp_path/"config"), "JUPYTER_RUNTIME_DIR": str(tmp_path/"runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path/"settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path/"workspaces")}
    notes = tmp_path/"settings"/"@jupyterlab"/"apputils-extension"/"notification.jupyterlab-settings"
    notes.parent.mkdir(parents=True); notes.write_text(json.dumps({"fetchNews": "false"}))   # no news toast over the page
    log = open(tmp_path/"jupyterlab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                             f"--IdentityProvider.token={token}", "--allow-root", f"--ServerApp.root_dir={work}", "--LabApp.news_url=",
                             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5); break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(tmp_path/'jupyterlab.log').read_text()[-3000:]}")
                time.sleep(0.5)
        drv = docs_browser.driver(width=1400, height=1000)
        try: yield drv, f"{base}/lab/tree/{LESSON}?token={token}"
        finally: drv.quit()
    finally:
        proc.terminate()
        try: proc.wait(timeout=30)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()

_IMAGE_DIGEST = """const done = arguments[arguments.length - 1];
const img = document.querySelector('.jp-OutputArea .widget-image');
if (!img || !img.src) { done(null); return; }
fetch(img.src).then(r => r.arrayBuffer()).then(b => crypto.subtle.digest('SHA-256', b))
  .then(h => done(Array.from(new Uint8Array(h)).map(x => x.toString(16).padStart(2, '0')).join('')), e => done('error ' + e));"""

def test_moving_a_slider_of_the_clip_explorer_redraws_its_figure(lab, tmp_path):
    try: _move_a_slider(*lab)
    except BaseException:
        lab[0].save_screenshot(str(tmp_path/"failure.png")); print(f"screenshot at the failure: {tmp_path/'failure.png'}"); raise

def _move_a_slider(drv, url):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    committed = (ROOT/"nbs"/LESSON).read_bytes()
    drv.set_script_timeout(30)
    drv.get(url)
    wait = lambda secs, cond, what: WebDriverWait(drv, secs).until(cond, message=f"timed out waiting for {what}")
    wait(120, lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), "the notebook to open")
    wait(120, lambda d: "Idle" in d.find_element(By.CSS_SELECTOR, ".jp-StatusBar-Widget, #jp-main-statusbar").text, "the kernel to start")
    # Run > Run All Cells, as a learner would
    [m for m in drv.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel") if m.text == "Run"][0].click()
    run_all = lambda d: [m for m in d.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel") if m.text == "Run All Cells"]
    wait(10, run_all, "the Run menu")
    run_all(drv)[0].click()
    wait(300, lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-OutputArea .widget-image") and drv.execute_async_script(_IMAGE_DIGEST),
         "the clip explorer's figure")
    wait(300, lambda d: "Idle" in d.find_element(By.CSS_SELECTOR, "#jp-main-statusbar").text, "every cell to finish")
    errors = [e.text[:300] for e in drv.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
              if "Error" in e.text or "Traceback" in e.text]
    assert not errors, errors
    explorer = drv.find_element(By.CSS_SELECTOR, ".jp-OutputArea .widget-image").find_element(By.XPATH, "./ancestor::div[contains(@class, 'widget-vbox')][1]")
    sliders = explorer.find_elements(By.CSS_SELECTOR, ".widget-slider, .widget-hslider")
    assert len(sliders) == 3, f"expected the explorer's three sliders, found {len(sliders)}"
    readout = lambda: sliders[0].find_element(By.CSS_SELECTOR, ".widget-readout").text
    before_value, before_image = readout(), drv.execute_async_script(_IMAGE_DIGEST)
    assert before_image and not before_image.startswith("error"), before_image
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'});", sliders[0])
    handle = sliders[0].find_element(By.CSS_SELECTOR, ".noUi-handle")
    ActionChains(drv).click_and_hold(handle).move_by_offset(-60, 0).pause(0.2).release().perform()   # ε = 0.2 -> smaller
    wait(60, lambda d: readout() != before_value, "the slider's value to change")
    wait(60, lambda d: drv.execute_async_script(_IMAGE_DIGEST) not in (before_image, None), "the figure to be redrawn")
    if os.environ.get("DDPO_LAB_SCREENSHOT"): drv.save_screenshot(os.environ["DDPO_LAB_SCREENSHOT"])   # to look at it
    after_value = float(readout())
    assert after_value < float(before_value), (before_value, after_value)
    assert (ROOT/"nbs"/LESSON).read_bytes() == committed   # JupyterLab ran (and may have saved) only the copy
