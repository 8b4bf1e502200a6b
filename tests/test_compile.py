"""`model.compile` end to end on the tiny offline pipeline. In a file of its own, collected early: compiling on an
empty inductor cache takes minutes, so pytest-xdist starts it while the other worker runs the rest."""
from ddpo_course.models import load_pipeline, same_weights
from ddpo_course.train import DDPOTrainer
from conftest import record_log_ratios, small   # the suite's small run (8 trajectories of 4 steps) and log-ratio recorder

def test_compiled_unet_is_the_eager_run_up_to_rounding_and_resumes(tmp_path, monkeypatch):
    """model.compile: the UNet compiled in place (checkpoints and the final folder keep diffusers' keys), the first
    steps' log-ratio within 1e-5 of 0 (generated kernels round differently with and without gradients), the run the
    eager one's up to rounding, and a resumed compiled run continues it."""
    seen = record_log_ratios(monkeypatch)
    args = ("sample.num_steps=4", "train.timestep_fraction=0.5", "train.timesteps_per_call=1", "sample.batches_per_call=1",
            "run.checkpoint_every=1",
            "train.log_kl_ref=false")                      # no reference copy to compile: the test takes minutes as it is
    eager = DDPOTrainer(small(tmp_path/"eager", "train.epochs=2", *args)).train()
    assert seen[:2] == [0.0, 0.0], seen[:2]
    seen.clear()
    compiled = DDPOTrainer(small(tmp_path/"compiled", "train.epochs=1", "model.compile=default", *args)).train()
    assert max(seen[:2]) < 1e-5, seen[:2]                  # 4.8e-7 measured
    tr = DDPOTrainer(small(tmp_path/"compiled", "train.epochs=2", "model.compile=default", "run.resume=true", *args))
    compiled = tr.train()                                  # the whole run's metrics, the first epoch's from before the resume
    assert [m["epoch"] for m in compiled] == [0, 1]
    for a, b in zip(eager, compiled):                      # the same samples and updates, up to float32 rounding
        assert abs(a["reward_mean"] - b["reward_mean"]) < 1e-4, (a, b)   # 2e-7 in epoch 0 measured
        assert abs(a["approx_kl"] - b["approx_kl"]) < 1e-2 * a["approx_kl"], (a, b)
    assert same_weights(load_pipeline(str(tmp_path/"compiled"/"final")).unet, tr.acc.unwrap_model(tr.unet))  # diffusers' keys
