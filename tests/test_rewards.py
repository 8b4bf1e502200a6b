"""Rewards: the toy rewards score the shape world's images, the judge is not a reward, and a reward that fails (NaN,
an exception on one process) stops every process with the epoch named and the last checkpoint intact."""
import subprocess, time

import pytest
import torch

from ddpo_course.rewards import REWARDS, RewardError, checked, get_reward
from ddpo_course.train import DDPOTrainer, TrainingError
from ddpo_course.runlog import latest_checkpoint
from conftest import ENV, SMALL, launch, small

def test_toy_rewards_on_world_images():
    from ddpo_course.world import world_tensors
    ims, caps, _, _ = world_tensors(16, seed=3)
    for name in ("toy_aesthetic", "gold", "alignment"):
        r = get_reward(name)(ims, caps)
        assert r.shape == (16,) and torch.isfinite(r).all(), name
    with pytest.raises(RewardError, match="not a shape-world caption"): get_reward("alignment")(ims[:1], ["a cat"])

def test_judge_is_not_the_reward_network():
    from ddpo_course.world import ShapeJudge, ShapeNet, load_judge, load_shapenet
    judge, net = load_judge(), load_shapenet()
    assert isinstance(judge, ShapeJudge) and not isinstance(judge, ShapeNet) and type(net) is ShapeNet
    kinds = lambda m: {type(x).__name__ for x in m.modules()}
    assert {"BatchNorm2d", "MaxPool2d"} <= kinds(judge) - kinds(net) and "GroupNorm" in kinds(net) - kinds(judge)

def test_nan_reward_stops_with_named_epoch_and_intact_checkpoint(tmp_path):
    calls = {"n": 0}
    def flaky(images, prompts):
        calls["n"] += 1
        r = torch.rand(len(prompts))
        if calls["n"] > 4: r[0] = float("nan")      # the evaluation before training, then epoch 0: two batches and its evaluation; epoch 1 fails
        return r
    REWARDS["flaky_test"] = lambda device, tiny: checked(flaky, "flaky_test")
    try:
        trainer = DDPOTrainer(small(tmp_path/"run", "train.epochs=3", "reward.name=flaky_test", "run.checkpoint_every=1"))
        with pytest.raises(TrainingError, match=r"epoch 1: reward 'flaky_test' returned non-finite"): trainer.train()
    finally: del REWARDS["flaky_test"]
    ck = latest_checkpoint(tmp_path/"run")
    assert ck.name == "epoch-0000"
    resumed = DDPOTrainer(small(tmp_path/"run", "train.epochs=1", "run.resume=true", "run.allow_config_change=true")).setup()   # the test reward is gone
    assert resumed.state.epoch == 0

FAILING_REWARD = '''
import os, sys, torch
from ddpo_course.rewards import REWARDS
from ddpo_course.train import main
def reward(images, prompts):
    if os.environ.get("RANK") == "1": raise RuntimeError("CUDA out of memory (simulated)")
    return torch.rand(len(prompts))
REWARDS["oom_test"] = lambda device, tiny: reward      # raises something other than RewardError
sys.exit(main(sys.argv[1:]))
'''

def test_any_reward_failure_on_one_process_stops_all_processes_with_the_error(tmp_path):
    script = tmp_path/"run_failing.py"; script.write_text(FAILING_REWARD)
    cmd = launch(str(script)) + ["tiny", f"run.dir={tmp_path/'run'}", *SMALL, "train.batch_size=2", "reward.name=oom_test"]
    t0 = time.time()
    out = subprocess.run(cmd, env=ENV, timeout=300, capture_output=True, text=True)
    assert out.returncode != 0 and time.time() - t0 < 300
    assert "training stopped: epoch 0: reward 'oom_test' failed: RuntimeError: CUDA out of memory (simulated)" in out.stderr
    assert "a reward failed on another process" in out.stderr     # rank 0 stops too, with its own clear message

