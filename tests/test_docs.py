"""The docs site, built offline by `tools/build_docs.py` and checked in headless Chromium: every page loads without
console errors, every image loads, every internal link (and its #anchor) resolves, every exported name has an API
entry, and the search box finds a lesson. Skipped without chromium and chromedriver, unless DDPO_REQUIRE_BROWSER=1
(as in CI), where their absence fails."""
import importlib, os, re, subprocess, sys, urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/"tools"))
import build_docs, docs_browser

@pytest.fixture(scope="module")
def site():
    """The site, built once per test run even when its tests land on several pytest-xdist workers: `--dist loadgroup`
    keeps them on one worker only where the installed pytest lets xdist mark node ids (pytest 9.2 does not:
    pytest-dev/pytest-xdist#1386). A lock serialises the build; a stamp with the run's id lets later workers reuse it."""
    import fcntl
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", f"solo-{os.getpid()}")
    stamp = build_docs.SITE/".built-by"
    with open(ROOT/".docs-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == run_id):
            subprocess.run([sys.executable, str(ROOT/"tools"/"build_docs.py")], check=True, cwd=ROOT, timeout=900,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
            stamp.write_text(run_id)
    return build_docs.SITE

@pytest.fixture(scope="module")
def browser(site):
    if docs_browser.chromium_paths() is None:
        if os.environ.get("DDPO_REQUIRE_BROWSER") == "1": pytest.fail("chromium/chromedriver missing: apt-get install chromium chromium-driver")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    with docs_browser.serve(site) as base:
        drv = docs_browser.driver()
        try: yield drv, base
        finally: drv.quit()

pytestmark = pytest.mark.xdist_group("docs")   # one worker for these where xdist can group them (see `site`)

def pages(site): return sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html") if not p.name.startswith("404"))

def test_site_has_every_lesson_and_module(site):
    names = set(pages(site))
    assert "index.html" in names
    assert {f"lessons/{p.stem}.html" for p in build_docs.lessons()} <= names
    assert {f"api/{m}.html" for m in build_docs.modules()} <= names
    assert len(build_docs.modules()) >= 10 and not (site/"lessons"/"_scratch").exists()
    unnumbered = [p.stem for p in build_docs.lessons() if not build_docs.is_appendix(p)
                  and f"{p.stem.split('_')[0]} · " not in (site/"lessons"/f"{p.stem}.html").read_text()]
    assert not unnumbered, f"lesson pages whose title lacks the lesson number: {unnumbered}"

def test_pages_load_without_console_errors_and_every_image_loads(site, browser):
    drv, base = browser
    problems = []
    for page in pages(site):
        docs_browser.load(drv, base + page)
        errors = [l["message"] for l in drv.get_log("browser") if l["level"] == "SEVERE"]
        broken = drv.execute_script("return Array.from(document.images).filter(i => !(i.naturalWidth > 0)).map(i => i.src.slice(0, 80))")
        if errors or broken: problems.append((page, errors[:3], broken[:3]))
    assert not problems, problems

def test_internal_links_and_anchors_resolve(site):
    html = {p: (site/p).read_text() for p in pages(site)}
    ids = {p: set(re.findall(r'\sid="([^"]+)"', t)) for p, t in html.items()}
    bad = []
    for page, text in html.items():
        for href in set(re.findall(r'href="([^"]+)"', text)):
            u = urllib.parse.urlparse(href)
            if u.scheme or href.startswith(("mailto:", "javascript:", "data:")): continue
            target = (Path(page).parent/urllib.parse.unquote(u.path)).as_posix() if u.path else page
            target = os.path.normpath(target)
            if target.endswith("/") or (site/target).is_dir(): target = os.path.join(target, "index.html")
            if not (site/target).exists(): bad.append((page, href)); continue
            if u.fragment and target.endswith(".html") and target in ids and u.fragment not in ids[target]: bad.append((page, href))
    assert not bad, bad[:20]

def test_every_exported_name_has_an_api_entry(site, browser):
    from selenium.webdriver.common.by import By
    drv, base = browser
    missing = []
    for m in build_docs.modules():
        docs_browser.load(drv, f"{base}api/{m}.html")
        headings = {h.text.strip() for h in drv.find_elements(By.CSS_SELECTOR, "article h3")}
        missing += [f"{m}.{n}" for n in importlib.import_module(f"ddpo_course.{m}").__all__ if n not in headings]
    assert not missing, missing

def test_search_finds_a_lesson(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    drv, base = browser
    docs_browser.load(drv, base + "index.html")
    drv.find_element(By.CSS_SELECTOR, "label.md-search__icon, .md-search__input").click()
    box = drv.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.send_keys("importance sampling")
    WebDriverWait(drv, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".md-search-result__item"))
    hits = [a.get_attribute("href") for a in drv.find_elements(By.CSS_SELECTOR, ".md-search-result__item a")]
    assert any("lessons/" in h for h in hits), hits

def test_readme_in_sync():
    res = subprocess.run([sys.executable, str(ROOT/"tools"/"make_readme.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr

def test_readme_links_to_local_files_resolve():
    text = (ROOT/"README.md").read_text()
    local = [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not m.startswith(("http://", "https://", "#"))]
    assert local and all((ROOT/m).exists() for m in local), [m for m in local if not (ROOT/m).exists()]

