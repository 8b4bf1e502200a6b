"Repository-level checks: the README is generated from the notebook, and the package uses public APIs only."
import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_readme_in_sync():
    res = subprocess.run([sys.executable, str(ROOT/"tools"/"make_readme.py"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr

def test_no_private_diffusers_api_or_cuda_calls():
    banned = re.compile(r"\._encode_prompt\b|\._get_variance\b|\.cuda\(")
    hits = [f"{p.name}:{i}" for p in (ROOT/"ddpo_course").glob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
    assert not hits, hits

def test_every_module_has_a_notebook():
    mods = {p.stem for p in (ROOT/"ddpo_course").glob("*.py") if not p.stem.startswith("_")}
    text = "".join(p.read_text() for p in (ROOT/"nbs").glob("*.ipynb"))
    missing = [m for m in mods if f"default_exp {m}" not in text]
    assert not missing, missing

def test_readme_links_to_local_files_resolve():
    text = (ROOT/"README.md").read_text()
    local = [m for m in re.findall(r"\]\(([^)\s]+)\)", text) if not m.startswith(("http://", "https://", "#"))]
    assert local and all((ROOT/m).exists() for m in local), [m for m in local if not (ROOT/m).exists()]
