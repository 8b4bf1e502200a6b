"""Re-run the shipped toy model's pretraining (lesson 00b's `pretrain_toy` with its defaults, unchanged), time it, and
rate its checkpoints as lesson 00b does; the log without the loss curves goes to OUT/pretrain-rerun.json.

    python tools/pretrain_rerun.py OUT     # about 14 min on a quiet 2-core Zen 5 EPYC, 33 min on an AVX2 EPYC

The shipped weights are not replaced: a re-run on another CPU rounds differently and is a different model."""
import json, sys, torch
from pathlib import Path
from ddpo_course.pretrain import pretrain_toy, rate_checkpoints

out = Path(sys.argv[1]); torch.set_num_threads(2)
pretrain_toy(out/"pipeline", checkpoint_dir=out/"checkpoints")
curve = rate_checkpoints(out/"pipeline", out/"checkpoints")   # also adds the curve to the run's pretrain_log.json
log = {k: v for k, v in json.loads((out/"pipeline"/"pretrain_log.json").read_text()).items() if not k.endswith("losses")}
(out/"pretrain-rerun.json").write_text(json.dumps(log, indent=1))
for c in curve: print(f"step {c['step']:5d} at {c['elapsed_s'] / 60:5.1f} min: " +
                      ", ".join(f"{k} {c[k]:.1%}" for k in ("common", "rare", "held-out", "background")))
