#!/usr/bin/env python
"""Write README.md from nbs/index.ipynb without Quarto (an offline stand-in for `nbdev_readme`).

Markdown cells are copied as they are (image links made relative to the repository root); the first cell's title and `> summary` become the README's heading. Code cells
are shown as Python blocks unless they carry `#| hide`. With `--check`, nothing is written and the exit status is 1
when README.md differs from what the notebook gives.
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def render(nb_path: Path) -> str:
    cells = json.loads(nb_path.read_text())["cells"]
    parts = []
    for cell in cells:
        src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "markdown": parts.append(src.strip().replace("](images/", "](nbs/images/"))   # the README sits one folder up
        elif cell["cell_type"] == "code" and src.strip() and not any(l.strip().startswith("#| hide") for l in src.splitlines()):
            code = "\n".join(l for l in src.splitlines() if not l.startswith("#|"))
            parts.append(f"```python\n{code.strip()}\n```")
    header = "<!-- generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->"
    return header + "\n\n" + "\n\n".join(parts) + "\n"

def main(argv=sys.argv[1:]):
    text, readme = render(ROOT/"nbs"/"index.ipynb"), ROOT/"README.md"
    if "--check" in argv:
        if not readme.exists() or readme.read_text() != text:
            print("README.md is out of date with nbs/index.ipynb: run `python tools/make_readme.py`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text)
    return 0

if __name__ == "__main__": sys.exit(main())
