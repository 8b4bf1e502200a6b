"""Lesson 09's experiment, phase by phase, into nbs/cpu_results/geneval-rl.json and nbs/images/geneval_grid.png:

    python tools/geneval_experiment.py probe           # two epochs of toy_geneval on 2 threads: seconds per epoch
    python tools/geneval_experiment.py pair EPOCHS SEED [TAG OVERRIDES...]  # the RL run and its control, one thread each
    python tools/geneval_experiment.py rivals MINUTES [NAMES]  # more pretraining and RAFT (default) for those minutes,
                                                       # one thread each; "oracle": more pretraining on true captions
    python tools/geneval_experiment.py final           # toy GenEval (480 test images) of every model, the runs' metrics
    python tools/geneval_experiment.py grid            # the before/after grid of the evaluation pairs

Run folders go under $GENEVAL_RUNS (default runs/geneval-rl)."""
import json, os, subprocess, sys, time
from pathlib import Path
import torch
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT/"nbs"/"cpu_results"/"geneval-rl.json"
RL = Path(os.environ.get("GENEVAL_RUNS", ROOT/"runs"/"geneval-rl"))
LOGS = RL/"logs"
def save(update):
    d = json.loads(OUT.read_text()) if OUT.exists() else {}
    d.update(update); OUT.write_text(json.dumps(d, indent=1))
def table(pipe):
    "The test split's toy GenEval (480 images, the RL sampler) by both readings; single objects' toy aesthetic, diversity."
    from ddpo_course.geneval import evaluation_prompts, geneval_prompts
    from ddpo_course.images import image_diversity
    from ddpo_course.rewards import toy_aesthetic_reward
    from ddpo_course.scene_model import geneval_of
    det, comp, ims = geneval_of(pipe, num_steps=10, eta=1.0, seed=0)
    prompts = evaluation_prompts("test")
    groups = [[i for i, p in enumerate(prompts) if p == q] for q in geneval_prompts("test", "single_object")]
    single = sum(groups, [])
    aesthetic = toy_aesthetic_reward()(ims[single], [prompts[i] for i in single]).mean().item()
    diversity = sum(image_diversity(ims[g]) for g in groups) / len(groups)
    return dict(detector=det, components=comp, single_aesthetic=aesthetic, single_diversity=diversity)
phase = sys.argv[1]
if phase == "probe":   # one epoch on 2 threads: seconds per epoch
    torch.set_num_threads(2)
    from ddpo_course.config import load_config
    from ddpo_course.train import DDPOTrainer
    cfg = load_config("toy_geneval", [f"run.dir={RL/'probe'}", "run.overwrite=true", "train.epochs=2", "run.trackers=[]",
                                      "run.progress=false", "run.eval_every=100"])
    m = DDPOTrainer(cfg).train()
    train_s = [r["epoch_s"] - r["eval_s"] for r in m]
    save(dict(probe=dict(epoch_s=sum(train_s) / len(train_s), eval_s=sum(r["eval_s"] for r in m) / len(m), threads=2,
                         peak_rss_mb=max(r["peak_rss_mb"] for r in m))))
    print([(r["epoch"], round(r["epoch_s"], 1), round(r["eval_s"], 1)) for r in m], flush=True)
elif phase == "run":    # one run: NAME SEED [overrides]
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    from ddpo_course.config import load_config
    from ddpo_course.train import DDPOTrainer
    name, seed, extra = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    cfg = load_config("toy_geneval", [f"run.dir={RL/name}", f"run.seed={seed}", "run.trackers=[]", "run.progress=false",
                                      "run.overwrite=true", *extra])
    t0 = time.perf_counter(); DDPOTrainer(cfg).train()
    print(f"{name}: {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
elif phase == "pair":   # the RL run and its shuffled control, side by side on one thread each
    epochs, seed = int(sys.argv[2]), sys.argv[3]
    tag, recipe = (sys.argv[4], sys.argv[5:]) if len(sys.argv) > 4 else ("", [])   # a recipe beside the preset's
    env = {**os.environ, "THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    LOGS.mkdir(parents=True, exist_ok=True)
    ps = [subprocess.Popen([sys.executable, __file__, "run", f"{name}{tag}-{seed}", seed, f"train.epochs={epochs}", *recipe, *extra],
                           env=env, stdout=open(LOGS/f"{name}{tag}-{seed}.log", "w"), stderr=subprocess.STDOUT)
          for name, extra in (("rl", []), ("control", ["train.shuffle_advantages=true"]))]
    print([p.wait() for p in ps], (time.time() - t0) / 60, flush=True)
elif phase == "rivals":   # more pretraining and RAFT for the RL run's minutes, side by side on one thread each
    minutes, names = float(sys.argv[2]), sys.argv[3:] or ["more", "raft"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    LOGS.mkdir(parents=True, exist_ok=True)
    ps = [subprocess.Popen([sys.executable, __file__, "rival", name, str(minutes)], env=env,
                           stdout=open(LOGS/f"{name}.log", "w"), stderr=subprocess.STDOUT) for name in names]
    print([p.wait() for p in ps], flush=True)
elif phase == "rival":
    torch.set_num_threads(1)
    name, minutes = sys.argv[2], float(sys.argv[3])
    if name == "more":
        from ddpo_course.experiments import pretrain_more
        from ddpo_course.scenes import scene_tensors
        curve = pretrain_more("toy-scenes", minutes * 60, rate=table, n_images=30_000, seed=1,
                              data=lambda n, s: scene_tensors(n, s)[:2])
    elif name == "oracle":   # the same minutes on captions that state everything, truly: what the data could teach
        from ddpo_course.experiments import pretrain_more
        from ddpo_course.scenes import scene_tensors
        true = dict(salient_only=0.0, colour=1.0, count=1.0, swap_colours=0.0, position=1.0, position_wrong=0.0)
        curve = pretrain_more("toy-scenes", minutes * 60, rate=table, n_images=30_000, seed=1,
                              data=lambda n, s: scene_tensors(n, s, rates=true)[:2])
    else:
        from ddpo_course.geneval_rl import raft
        curve = raft("toy-scenes", minutes * 60, rate=table)
    (RL/f"{name}.json").write_text(json.dumps(curve))
elif phase == "final":    # the 480-image table of the base model and the two RL runs; the runs' metrics
    torch.set_num_threads(2)
    from ddpo_course.models import load_pipeline
    from ddpo_course.runlog import read_metrics
    res = dict(base=table(load_pipeline("toy-scenes")))
    for name in sorted(p.name for p in RL.iterdir() if p.name.startswith(("rl", "control")) and (p/"final").is_dir()):
        res[name] = table(load_pipeline(RL/name/"final"))
        res[name + "_metrics"] = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in read_metrics(RL/name)]
    for name in ("more", "raft", "oracle"):
        if (RL/f"{name}.json").exists(): res[name] = json.loads((RL/f"{name}.json").read_text())
    save(res)
if phase == "grid":    # the same test prompts and noise: before training, after RL, after its control
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    from ddpo_course.config import load_config
    from ddpo_course.geneval import geneval_score
    from ddpo_course.runlog import read_metrics
    prompts = load_config("toy_geneval").run.eval_prompts
    last = read_metrics(RL/"rl-0")[-1]["epoch"]
    rows = {"pretrained": torch.load(RL/"rl-0"/"samples"/"eval-before.pt"),
            f"RL, epoch {last}": torch.load(RL/"rl-0"/"samples"/f"eval-epoch-{last:04d}.pt"),
            f"control, epoch {last}": torch.load(RL/"control-0"/"samples"/f"eval-epoch-{last:04d}.pt")}
    pick = [i for t in range(6) for i in (8 * t + 1, 8 * t + 4)]       # two prompts of each task
    fig, axs = plt.subplots(3, len(pick), figsize=(1.45 * len(pick), 5.4))
    for r, (label, ims) in enumerate(rows.items()):
        ok = geneval_score(ims[pick], [prompts[i] for i in pick])["correct"]
        for c, i in enumerate(pick):
            ax = axs[r, c]; ax.imshow(ims[i].numpy()); ax.set_xticks([]); ax.set_yticks([])
            ax.set_xlabel("✓" if ok[c] else "✗", fontsize=9, color="green" if ok[c] else "red", labelpad=1)
            if c == 0: ax.set_ylabel(label, fontsize=8)
            if r == 0: ax.set_title(prompts[i].removeprefix("a photo of ").replace(" and ", "\nand ")
                                    .replace(" left of", "\nleft of").replace(" right of", "\nright of")
                                    .replace(" above", "\nabove").replace(" below", "\nbelow"), fontsize=6.5)
    fig.tight_layout(pad=0.3); fig.savefig(ROOT/"nbs"/"images"/"geneval_grid.png", dpi=90, bbox_inches="tight")
