"""Execute lessons in place, so their committed outputs come from running them.

    python tools/execute_nb.py nbs/04_loss.ipynb [more.ipynb ...] [--flags slow] [--ids f0c1a003 ...]

Cells flagged `#| slow`, `#| hub`, `#| gpu` or `#| bench` keep their committed outputs (they come from a real run
elsewhere) unless their flag is named in --flags, exactly as `nbdev_test` skips them, or their cell id in --ids. `#| eval: false` cells never
run. Stops at the first exception and leaves that notebook unwritten. Run `nbdev_clean` afterwards."""
import argparse, os, re, sys, time
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

FLAGS = ("slow", "hub", "gpu", "bench")

def skipped(cell, flags:set, ids:set=frozenset()) -> bool:
    "Whether `cell` keeps its committed outputs: not code, `eval: false`, or flagged with a flag not asked for (and its id not named)."
    if cell.cell_type != "code": return True
    if cell.get("id") in ids: return False
    heads = [l[3:].strip() for l in cell.source.splitlines() if l.startswith("#|")]
    if any(re.fullmatch(r"eval:\s*false", h) for h in heads): return True
    return any(h in FLAGS and h not in flags for h in heads)

def execute(path:Path, flags:set, ids:set=frozenset()) -> float:
    "Run `path` in place from its own folder; the seconds it took."
    nb, cwd, t0 = read_nb(path), os.getcwd(), time.perf_counter()
    os.chdir(path.parent)
    try: CaptureShell(path).run_all(nb, exc_stop=True, preproc=lambda c: skipped(c, flags, ids))
    finally: os.chdir(cwd)
    write_nb(nb, path)
    return time.perf_counter() - t0

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--flags", nargs="*", default=[], choices=FLAGS, help="flagged cells to run as well")
    p.add_argument("--ids", nargs="*", default=[], help="ids of flagged cells to run as well")
    args = p.parse_args()
    for nb in args.notebooks:
        print(f"{nb}: {execute(nb.resolve(), set(args.flags), set(args.ids)):.0f} s", flush=True)
    sys.exit(0)
