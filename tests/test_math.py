"""The trainer's math on the tiny offline pipeline: the ratio is exactly 1 before the first step, fused calls give the
gradient of separate ones, the KL to the reference starts at 0 and the penalty keeps it smaller, the control deals the
same advantages at random, and settings that must not change the run (scoring thread, channels-last) do not."""
import pytest
import torch

from ddpo_course.models import load_pipeline
from ddpo_course.train import DDPOTrainer
from conftest import record_log_ratios, small

def _recording(monkeypatch, name, keep):
    "Replace `ddpo_course.epoch.<name>` by a wrapper that appends `keep(*args)` to a list before calling it; the list."
    import ddpo_course.epoch as tr
    real, seen = getattr(tr, name), []
    def wrapper(*args, **kw): seen.append(keep(*args)); return real(*args, **kw)
    monkeypatch.setattr(tr, name, wrapper)
    return seen

@pytest.mark.parametrize("per_call,calls_per_step", [("1", 2), ("all", 1)])
def test_ratio_is_one_at_the_first_micro_step_of_the_trainers_own_indexing(tmp_path, monkeypatch, per_call, calls_per_step):
    seen = record_log_ratios(monkeypatch)
    DDPOTrainer(small(tmp_path/"run", "train.epochs=1", "sample.num_steps=4", "train.timestep_fraction=0.5",
                      f"train.timesteps_per_call={per_call}", "sample.batches_per_call=1")).train()
    accumulate = calls_per_step     # loss calls per minibatch (2 timesteps, one or both per call): the first optimizer step comes after them
    if per_call == "1":             # the UNet sees the batches it saw while sampling (one per call): the log-ratio is exactly 0
        assert max(seen[:accumulate]) == 0, seen[:accumulate]
    else:                           # two timesteps in one call: other float32 kernels (1e-6 at one thread), same weights
        assert max(seen[:accumulate]) < 1e-5, seen[:accumulate]
    assert min(seen[accumulate:]) > 1e-3, seen          # after the first step the policy has moved (by 0.06 to 0.6 here)

@pytest.mark.parametrize("lora", [False, True])
def test_fused_timesteps_give_the_gradient_of_one_call_per_timestep(tmp_path, lora):
    # 8 trajectories, one minibatch, guidance and the KL penalty on: the first optimizer step's gradient, 1 or all trained timesteps per call
    grads, counts = {}, {}
    for k in ("1", "all"):
        tr = DDPOTrainer(small(tmp_path/k, "train.batch_size=8", f"train.timesteps_per_call={k}", "train.max_grad_norm=1e9",
                               "train.kl_coef=0.5", f"model.lora={str(lora).lower()}")).setup()
        assert tr.cfg.sample.guidance_scale > 1
        samples = tr.sample_epoch(0); traj, rewards = samples.traj, samples.rewards
        calls = [0]
        h = tr.acc.unwrap_model(tr.unet).register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        def record(*a, **kw): grads[k] = [p.grad.detach().clone() for p in tr.params]
        tr.opt.step = record                       # keep the gradient, take no step
        tr.train_epoch(0, traj, torch.linspace(-1, 1, len(rewards)))
        h.remove(); counts[k] = calls[0]
    n, ref = tr.n_train_steps, 2 if lora else 1           # with LoRA the reference is the same UNet: its calls count too
    assert n > 1 and counts == {"1": n * ref, "all": ref}
    for a, b in zip(grads["1"], grads["all"]): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().max() > 0 for g in grads["all"])

def test_nft_fused_draws_give_the_gradient_of_one_call_per_draw(tmp_path):
    "train.method=nft: the noise draws of a minibatch in one UNet call or one per call, the same first gradient."
    grads, counts = {}, {}
    for k in ("1", "all"):
        tr = DDPOTrainer(small(tmp_path/k, "train.batch_size=8", "train.method=nft", f"train.timesteps_per_call={k}",
                               "train.max_grad_norm=1e9")).setup()
        assert not hasattr(tr, "ref_unet")                 # no reverse step to compare: no reference copy
        samples = tr.sample_epoch(0); traj, rewards = samples.traj, samples.rewards
        calls = [0]
        h = tr.acc.unwrap_model(tr.unet).register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        def record(*a, **kw): grads[k] = [p.grad.detach().clone() for p in tr.params]
        tr.opt.step = record                                # keep the gradient, take no step
        stats = tr.train_epoch(0, traj, torch.linspace(-1, 1, len(rewards)))
        h.remove(); counts[k] = calls[0]
    n = tr.n_train_steps
    assert n > 1 and counts == {"1": 2 * n, "all": 2}      # ε_old (no grad) and the training call, per chunk of draws
    for a, b in zip(grads["1"], grads["all"]): torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().max() > 0 for g in grads["all"]) and stats["nft_shift"] < 1e-10   # no step taken: ε_θ = ε_old

def test_nft_draws_only_noise_levels_from_nft_t_min(tmp_path):
    "train.nft_t_min: every timestep the UNet sees in NFT's epoch (ε_old and training calls) is at least it; at 0 lower ones occur."
    seen = {}
    for t_min in (0, 900):
        tr = DDPOTrainer(small(tmp_path/str(t_min), "train.batch_size=8", "train.method=nft", f"train.nft_t_min={t_min}")).setup()
        samples = tr.sample_epoch(0); traj, rewards = samples.traj, samples.rewards
        ts = []
        h = tr.acc.unwrap_model(tr.unet).register_forward_pre_hook(lambda mod, args: ts.append(args[1].detach().clone()))
        tr.train_epoch(0, traj, torch.linspace(-1, 1, len(rewards)))
        h.remove(); seen[t_min] = torch.cat(ts)
    assert seen[900].min() >= 900 and seen[900].max() <= 999 and len(seen[900]) == len(seen[0])
    assert seen[0].min() < 900

@pytest.mark.parametrize("lora", [False, True])
def test_kl_to_reference_is_zero_before_training(tmp_path, lora):
    from ddpo_course.loss import gaussian_kl
    from ddpo_course.sampling import policy_step, sample_trajectories
    trainer = DDPOTrainer(small(tmp_path/"setup", f"model.lora={str(lora).lower()}")).setup()
    pipe, s = trainer.pipe, trainer.cfg.sample
    traj = sample_trajectories(pipe, ["cat", "owl"], s.num_steps, s.guidance_scale, s.eta, generator=torch.Generator().manual_seed(0))
    args = (traj.latents[:, 1], traj.latents[:, 2], traj.timesteps[:, 1], traj.prompt_embeds, traj.uncond_embeds, s.guidance_scale, s.eta)
    with torch.no_grad(): step = policy_step(trainer.unet, pipe.scheduler, *args)
    assert (gaussian_kl(step.mean, trainer.reference_mean(pipe.scheduler, args), step.std) == 0).all()
    if not lora: assert trainer.ref_unet is not trainer.acc.unwrap_model(trainer.unet)     # full fine-tuning: a frozen copy

def test_kl_penalty_keeps_the_policy_closer_to_the_pretrained_model(tmp_path):
    # the same run with and without the penalty: with it, the policy stays measurably closer to the pretrained model
    extra = ["train.epochs=3", "train.learning_rate=3e-3"]
    free = DDPOTrainer(small(tmp_path/"free", *extra)).train()
    held = DDPOTrainer(small(tmp_path/"held", *extra, "train.kl_coef=100")).train()
    assert all(m["kl_ref"] >= 0 for m in free + held) and free[-1]["kl_ref"] > 0
    assert held[-1]["kl_ref"] < 0.5 * free[-1]["kl_ref"], (held[-1]["kl_ref"], free[-1]["kl_ref"])

def test_scoring_in_a_thread_or_in_sequence_gives_the_same_epoch(tmp_path):
    out = {}
    for overlap in ("true", "false"):
        tr = DDPOTrainer(small(tmp_path/overlap, f"reward.overlap={overlap}", "sample.batch_size=2")).setup()
        samples = tr.sample_epoch(0)
        out[overlap], error = (samples.traj.latents, samples.rewards, samples.prompts), samples.error
    torch.testing.assert_close(out["true"][0], out["false"][0], rtol=0, atol=0)
    torch.testing.assert_close(out["true"][1], out["false"][1], rtol=0, atol=0)
    assert out["true"][2] == out["false"][2] and error is None

def test_batches_sampled_in_one_call_are_the_batches_sampled_alone(tmp_path):
    "sample.batches_per_call: two batches in one UNet call per step get the noise, prompts and samples they get alone."
    out, calls = {}, {}
    for k in ("1", "2"):
        tr = DDPOTrainer(small(tmp_path/k, f"sample.batches_per_call={k}")).setup()
        n = [0]
        h = tr.acc.unwrap_model(tr.unet).register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        out[k] = tr.sample_epoch(0); h.remove(); calls[k] = n[0]
    one, two = out["1"], out["2"]
    assert (calls["1"], calls["2"]) == (2 * 4, 4)              # 2 batches x 4 steps, or one call per step
    assert one.prompts == two.prompts and one.error is None and two.error is None
    torch.testing.assert_close(one.traj.latents[:, 0], two.traj.latents[:, 0], rtol=0, atol=0)   # x_T bit for bit
    rel = (one.traj.latents - two.traj.latents).abs().max() / one.traj.latents.abs().max()
    assert rel < 1e-5, rel                                      # then float rounding of the larger call only
    torch.testing.assert_close(one.traj.log_probs, two.traj.log_probs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one.rewards, two.rewards, rtol=1e-3, atol=1e-3)

def test_channels_last_is_the_same_run_on_other_kernels(tmp_path, monkeypatch):
    "model.channels_last: the UNet's weights in channels-last format, the replay still exact, the run the plain one's up to rounding."
    seen = record_log_ratios(monkeypatch)
    runs = {}
    for cl in ("false", "true"):
        seen.clear()
        tr = DDPOTrainer(small(tmp_path/cl, "train.epochs=2", "sample.num_steps=4", "train.timestep_fraction=0.5",
                               "train.timesteps_per_call=1", "sample.batches_per_call=1", f"model.channels_last={cl}"))
        runs[cl] = tr.train()
        assert tr.acc.unwrap_model(tr.unet).conv_in.weight.is_contiguous(memory_format=torch.channels_last) == (cl == "true")
        assert seen[:2] == [0.0, 0.0], seen[:2]       # the batches sampling saw, on the same kernels: log-ratio exactly 0
    for a, b in zip(runs["false"], runs["true"]):  # the same samples and updates, up to float32 rounding (which Adam then grows)
        assert abs(a["reward_mean"] - b["reward_mean"]) < 1e-4, (a, b)   # 3e-8 in epoch 0, 3e-6 in epoch 1 measured
    a, b = runs["false"][0]["approx_kl"], runs["true"][0]["approx_kl"]    # log-probs after the first steps: 0.3% apart measured
    assert abs(a - b) < 1e-2 * a, (a, b)

@pytest.mark.parametrize("method", ["is", "nft"])
def test_shuffled_advantage_control_deals_the_same_advantages_at_random(tmp_path, monkeypatch, method):
    "train.shuffle_advantages: the same samples, rewards and advantages per optimizer step, given to other trajectories."
    runs = {}
    for control in (False, True):
        advs = (_recording(monkeypatch, "ddpo_loss", lambda lp, old, adv, *a: adv.detach().clone()) if method == "is" else
                _recording(monkeypatch, "nft_loss", lambda eps, old, noise, adv, *a: adv.detach().clone()))
        m = DDPOTrainer(small(tmp_path/f"run-{control}", "train.epochs=1", "train.global_batch_size=8", "train.log_kl_ref=false",
                              "train.timesteps_per_call=all", f"train.shuffle_advantages={control}", f"train.method={method}")).train()
        runs[control] = m[0], torch.cat(advs)
    (real, a), (shuffled, b) = runs[False], runs[True]
    assert real["reward_mean"] == shuffled["reward_mean"] and real["reward_std"] == shuffled["reward_std"]   # same samples
    assert sorted(a.tolist()) == sorted(b.tolist()) and not torch.equal(a, b)                             # same step, dealt anew

def test_first_timesteps_train_only_the_noisiest_steps(tmp_path, monkeypatch):
    steps = _recording(monkeypatch, "policy_step", lambda unet, sched, x, xn, ts, *a: ts.clone())
    DDPOTrainer(small(tmp_path/"run", "train.epochs=1", "train.timesteps=first", "train.timestep_fraction=0.5",
                      "train.log_kl_ref=false")).train()
    sched = load_pipeline("tiny").scheduler; sched.set_timesteps(4)
    assert set(torch.cat(steps).tolist()) == set(sched.timesteps[:2].tolist())

