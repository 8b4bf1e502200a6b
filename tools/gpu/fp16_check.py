"""fp16 training on a GPU (issue 10, fault 1): the tiny pipeline, full fine-tuning and LoRA, a few epochs.
Prints whether the run finished, the GradScaler's final scale and how many optimizer steps were skipped."""
import sys, tempfile
from ddpo_course.config import load_config
from ddpo_course.models import quiet_hf
from ddpo_course.train import DDPOTrainer, TrainingError
quiet_hf()
for lora in (False, True):
    d = tempfile.mkdtemp()
    tr = DDPOTrainer(load_config("tiny", [f"run.dir={d}/run", "model.mixed_precision=fp16", f"model.lora={lora}", "train.epochs=3",
                                          "sample.num_steps=4", "sample.samples_per_epoch=8", "sample.batch_size=4", "train.batch_size=4",
                                          "run.trackers=[]", "run.progress=false", "run.eval_every=100"])).setup()
    skipped = []
    step = tr.opt.step
    def counting_step(*a, **k):
        r = step(*a, **k)
        if tr.acc.sync_gradients: skipped.append(tr.opt.step_was_skipped)
        return r
    tr.opt.step = counting_step
    try:
        m = tr.train()
        print(f"fp16 lora={lora}: finished {len(m)} epochs on {tr.acc.device}; optimizer steps {len(skipped)}, skipped {sum(skipped)}, "
              f"final loss scale {tr.acc.scaler.get_scale():.0f}; reward {[round(x['reward_mean'], 4) for x in m]}")
    except TrainingError as e: print(f"fp16 lora={lora}: TrainingError: {e}")
