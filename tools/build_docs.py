"""Build the course's website offline, without Quarto: `python tools/build_docs.py` writes it to `_site/`.

nbdev_docs needs Quarto, which cannot be installed everywhere. This builds the same content with mkdocs: every lesson
is its committed notebook (outputs and figures as run, nothing re-executed; nbdev's `#|` directives and hidden cells
removed), each exported definition is followed by its nbdev `show_doc` entry (signature, docments table, docstring),
and an API reference lists every name in every module's `__all__`. mkdocs-material gives the navigation (lessons in
course order) and a client-side search box; mkdocs-jupyter renders the notebooks. The pages load nothing from the
network (formulas are MathML, made at build time). Open `_site/index.html`, or serve the folder: `python -m http.server -d _site`.
"""
from __future__ import annotations
import argparse, ast, copy, importlib, inspect, json, os, re, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS, BUILD, SITE = ROOT/"nbs", ROOT/"_docs_src", ROOT/"_site"
PACKAGE = "ddpo_course"

def lessons() -> list[Path]:
    "The lessons in course order: the numbered notebooks as the course table lists them, then the appendices (A1, A2, ...)."
    return sorted(NBS.glob("[0-9]*.ipynb")) + sorted(NBS.glob("A[0-9]*.ipynb"))

def is_appendix(nb_path:Path) -> bool: return nb_path.name.startswith("A")

def modules() -> list[str]:
    "Every module of the package that exports names, in the order of the lessons that build them."
    order = []
    for nb in lessons():
        for c in json.loads(nb.read_text())["cells"]:
            m = re.search(r"^#\|\s*default_exp\s+(\S+)", "".join(c["source"]), re.M)
            if m and m.group(1) not in order: order.append(m.group(1))
    return order

def title(nb:dict, fallback:str) -> str:
    for c in nb["cells"]:
        m = re.match(r"#\s+(.+)", "".join(c["source"])) if c["cell_type"] == "markdown" else None
        if m: return m.group(1).strip()
    return fallback

def _clean_md(md:str) -> str:
    "nbdev's show_doc markdown made plain: no Quarto attributes, no broken line anchors."
    md = re.sub(r"\[source\]\((\S+?)(#LNone)?\)\{[^}]*\}", lambda m: f"[source]({m.group(1)})", md)
    return md.replace("\n---\n", "\n", 1) if md.startswith("---") else md

def entry(mod, name:str) -> str:
    "The reference entry of one exported name: nbdev's show_doc for functions and classes, type and value otherwise."
    from nbdev.showdoc import show_doc
    obj = getattr(mod, name)
    if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismethod(obj):
        md = _clean_md(show_doc(obj, name=name)._repr_markdown_())
        return md.replace(f"### {obj.__name__}", f"### {name}", 1) if obj.__name__ != name else md
    value = repr(obj)
    value = value if len(value) < 400 else value[:400] + " …"
    return f"### {name}\n\n*{type(obj).__name__}*\n\n```python\n{name} = {value}\n```\n"

def _defined(src:str) -> list[str]:
    "Top-level names a code cell defines."
    try: tree = ast.parse(src)
    except SyntaxError: return []
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): names.append(node.name)
        elif isinstance(node, ast.Assign): names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name): names.append(node.target.id)
    return names

def _md_cell(text:str) -> dict: return {"cell_type": "markdown", "metadata": {}, "source": text}

def process(path:Path) -> dict:
    "A lesson as the site shows it: directives and hidden cells removed, show_doc entries after exported definitions."
    nb = json.loads(path.read_text())
    mod, cells = None, []
    for c in nb["cells"]:
        src = "".join(c["source"])
        directives = re.findall(r"^#\|\s*(\w+)(.*)$", src, re.M)
        names = [d for d, _ in directives]
        if "default_exp" in names:
            mod = importlib.import_module(f"{PACKAGE}.{dict(directives)['default_exp'].strip()}"); continue
        if "hide" in names or "exporti" in names: continue
        c = copy.deepcopy(c)
        if c["cell_type"] == "markdown": c["source"] = mathml(src)
        if c["cell_type"] == "code":
            c["source"] = re.sub(r"^#\|.*\n?", "", src, flags=re.M)
            c.pop("id", None)
        cells.append(c)
        if "export" in names and mod is not None:
            for n in _defined(src):
                if n in getattr(mod, "__all__", []):   # inline, as a bold name: headings here would crowd the lesson's contents
                    cells.append(_md_cell(re.sub(r"^### (.+)$", lambda m: f"**`{m.group(1)}`**", entry(mod, n), count=1, flags=re.M)))
    nb["cells"] = cells
    return nb

def numbered(nb:dict, num:str):
    "Put the lesson's number in its title: '# Models' becomes '# 00 · Models' (the page heading and its navigation entry)."
    for c in nb["cells"]:
        if c["cell_type"] == "markdown" and re.match(r"#\s+", "".join(c["source"])):
            c["source"] = re.sub(r"^#\s+", f"# {num} · ", "".join(c["source"]), count=1); return

def api_page(modname:str) -> str:
    mod = importlib.import_module(f"{PACKAGE}.{modname}")
    doc = (mod.__doc__ or "").strip()
    parts = [f"# {PACKAGE}.{modname}\n", doc + "\n" if doc else ""]
    parts += [entry(mod, n) for n in mod.__all__]
    return "\n".join(parts)

def mkdocs_yml(nav:list) -> dict:
    return {
        "site_name": "ddpo_course", "site_description": "DDPO from scratch: a course and a package",
        "docs_dir": str(BUILD), "site_dir": str(SITE), "use_directory_urls": False,
        "theme": {"name": "material", "font": False, "features": ["navigation.sections", "navigation.top", "search.highlight"]},
        "plugins": ["search", {"mkdocs-jupyter": {"execute": False, "include_source": False, "ignore_h1_titles": False,
                                                   "include_requirejs": False}}],
        "markdown_extensions": ["tables", "fenced_code", "admonition", "attr_list", "toc"],
        "nav": nav,
    }

def build(strict:bool=True) -> Path:
    start = time.time()
    shutil.rmtree(BUILD, ignore_errors=True); shutil.rmtree(SITE, ignore_errors=True)
    (BUILD/"lessons").mkdir(parents=True); (BUILD/"api").mkdir()
    if (NBS/"images").exists(): shutil.copytree(NBS/"images", BUILD/"images")
    index = process(NBS/"index.ipynb")
    (BUILD/"index.ipynb").write_text(json.dumps(index))
    nav = [{"Start": "index.ipynb"}]
    lesson_nav, appendix_nav = [], []
    for p in lessons():
        nb = process(p)
        if not is_appendix(p): numbered(nb, p.stem.split("_")[0])
        (BUILD/"lessons"/p.name).write_text(json.dumps(nb))
        # mkdocs-jupyter names a page after its notebook's H1, so the lesson number goes into the H1 itself
        (appendix_nav if is_appendix(p) else lesson_nav).append({title(nb, p.stem): f"lessons/{p.name}"})
    nav.append({"Lessons": lesson_nav})
    if appendix_nav: nav.append({"Appendices": appendix_nav})
    api_nav = []
    for m in modules():
        (BUILD/"api"/f"{m}.md").write_text(api_page(m))
        api_nav.append({f"{PACKAGE}.{m}": f"api/{m}.md"})
    nav.append({"API reference": api_nav})
    import yaml
    cfg = BUILD.parent/"_docs_mkdocs.yml"
    cfg.write_text(yaml.safe_dump(mkdocs_yml(nav), sort_keys=False))
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q", "-f", str(cfg)] + (["--strict"] if strict else []),
                   check=True, cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    print(f"site built in {time.time() - start:.0f} s: {SITE/'index.html'} ({len(lessons())} lessons, {len(modules())} modules)")
    return SITE

_CODE = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)
_MATH = re.compile(r"\$\$(.+?)\$\$|\$([^$\n]+?)\$", re.S)

def mathml(md:str) -> str:
    """Markdown with its $...$ and $$...$$ formulas turned into MathML, which browsers render natively: no MathJax, no
    fonts or scripts to fetch. Code spans and fenced blocks are left alone."""
    from latex2mathml.converter import convert
    def one(m):
        display = m.group(1) is not None
        return convert((m.group(1) or m.group(2)).strip(), display="block" if display else "inline")
    return "".join(part if i % 2 else _MATH.sub(one, part) for i, part in enumerate(_CODE.split(md)))

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-strict", action="store_true", help="do not stop on mkdocs warnings")
    build(strict=not p.parse_args().no_strict)
