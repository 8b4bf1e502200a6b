"""Summarise `tools/compile_default_run.sh OUT` into nbs/cpu_results/compile-default-run.json.

    python tools/compile_summary.py OUT [--machine-state "quiet"]

For each run (eager, cold, warm): its wall time, its first epoch, the median of its steady epochs (epochs 2 and on that
neither evaluate nor measure the gradient's signal-to-noise), their sampling and training phases, and the final
pair-by-pair evaluation, so the lesson can show that compiling changed the speed and not the result."""
import argparse, json, statistics, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpo_course.bench import machine_info
from ddpo_course.train import read_metrics

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("out", type=Path)
p.add_argument("--machine-state", default="quiet: nothing else running")
args = p.parse_args()
wall = dict(l.split() for l in (args.out/"wall.txt").read_text().splitlines())
runs = {}
for run, w in wall.items():
    m = read_metrics(args.out/run)
    steady = [r for r in m if r["epoch"] >= 2 and r.get("eval_s", 0) < 0.05 and "grad_cos" not in r]
    med = lambda k: statistics.median(r[k] for r in steady)
    runs[run] = dict(wall_s=round(float(w), 1), epochs=len(m), steady_epochs=[r["epoch"] for r in steady],
                     steady_epoch_s=round(med("epoch_s"), 3), steady_sampling_s=round(med("sampling_s"), 3),
                     steady_training_s=round(med("training_s"), 3), first_epoch_s=round(m[0]["epoch_s"], 1),
                     final={k: v for k, v in m[-1].items() if k.startswith("eval_win_") or k in ("reward_mean", "eval_aligned")})
res = dict(machine=machine_info(), machine_state=args.machine_state, command="tools/compile_default_run.sh", runs=runs)
dest = Path(__file__).resolve().parents[1]/"nbs"/"cpu_results"/"compile-default-run.json"
dest.write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(res, indent=1))
