"""The notebooks as a course: every module has its lesson, every lesson opens with what it builds and closes with a
summary and its sources, every notebook is in the lesson table, the code uses no private diffusers API, and the
interactive figures redraw outside a notebook (the JupyterLab check is in test_jupyterlab.py)."""
import json, re, sys

import matplotlib
matplotlib.use("Agg")

from ddpo_course.loss import clip_explorer, plot_clipped_objective
from conftest import ROOT
sys.path.insert(0, str(ROOT/"tools"))
import build_docs   # its `lessons()`: the numbered lessons, then the appendices

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

def test_every_lesson_opens_with_what_it_builds_and_closes_with_a_summary_and_its_sources():
    "Each lesson and appendix: an opening right after the title, and a last section `## Summary` of three lines plus links."
    nbs = build_docs.lessons()
    assert len(nbs) >= 16, [p.name for p in nbs]
    bad = []
    for p in nbs:
        cells = json.loads(p.read_text())["cells"]
        if not ("".join(cells[1]["source"]).startswith("**What this") and cells[1]["cell_type"] == "markdown"):
            bad.append(f"{p.name}: cell 2 is not the opening '**What this lesson builds:** ...'")
        last = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"][-1]
        bullets = [l for l in last.splitlines() if l.startswith("- ")]
        if not last.startswith("## Summary") or len(bullets) != 3:
            bad.append(f"{p.name}: the last markdown cell is not '## Summary' with three '- ' lines ({len(bullets)})")
        if "**Where the ideas come from:**" not in last or not re.search(r"\]\(https?://", last):
            bad.append(f"{p.name}: the summary lacks 'Where the ideas come from' with at least one link")
    assert not bad, "\n".join(bad)

def test_every_notebook_is_in_the_lesson_table():
    table = "".join("".join(c["source"]) for c in json.loads((ROOT/"nbs"/"index.ipynb").read_text())["cells"])
    missing = [p.stem for p in (ROOT/"nbs").glob("*.ipynb") if p.stem != "index" and f"| `{p.stem}` |" not in table]
    assert not missing, missing

def test_plot_clipped_objective_outside_a_notebook():
    ax = plot_clipped_objective(0.2)
    assert len(ax.lines) >= 2 and "ε = 0.2" in ax.get_title()

def test_clip_explorer_redraws_outside_a_notebook():
    box = clip_explorer()
    image = box.children[-1]
    before = image.value
    box.children[0].value = 0.01
    assert before and image.value != before


def floors() -> dict[str, int]:
    "CONTRIBUTING.md's stack: module name -> floor, read from its table."
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \|", (ROOT/"CONTRIBUTING.md").read_text(), flags=re.M)
    return {m: int(f) for f, m in rows}

def test_each_module_imports_only_modules_on_lower_floors():
    "The stack of CONTRIBUTING.md holds: no import runs back up or sideways, and every module has a floor."
    import ast
    table = floors()
    modules = sorted(p.stem for p in (ROOT/"ddpo_course").glob("*.py") if not p.stem.startswith("_"))
    assert sorted(table) == modules, f"CONTRIBUTING.md's stack lacks or has extra modules: {set(table) ^ set(modules)}"
    bad = []
    for m in modules:
        tree = ast.parse((ROOT/"ddpo_course"/f"{m}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else [node.module or a.name for a in node.names]
                names = [n.removeprefix("ddpo_course.") for n in names if node.level or n.startswith("ddpo_course.")]
            elif isinstance(node, ast.Import):
                names = [a.name.removeprefix("ddpo_course.") for a in node.names if a.name.startswith("ddpo_course.")]
            else: continue
            bad += [f"{m} (floor {table[m]}) imports {n} (floor {table[n]})" for n in names
                    if n in table and table[n] >= table[m]]
    assert not bad, "imports that run back up or sideways: " + "; ".join(bad)
