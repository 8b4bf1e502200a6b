"""End-to-end checks of the training job on the tiny offline pipeline: one and two processes, LoRA and full
fine-tuning, exact resume after SIGKILL, failures that stop the run cleanly, and one test per bad config value."""
import json, os, re, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpo_course.config import load_config
from ddpo_course.models import load_pipeline, same_weights
from ddpo_course.rewards import REWARDS, checked
from ddpo_course.train import DDPOTrainer, TrainingError, latest_checkpoint, main, read_metrics

# A small, fast run: 8 trajectories of 4 steps per epoch.
SMALL = ["sample.num_steps=4", "sample.samples_per_epoch=8", "sample.batch_size=4", "train.batch_size=4",
         "run.trackers=[]", "run.progress=false", "run.eval_every=100"]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def launch(*program) -> list[str]:
    """`accelerate launch` of two CPU processes on a free port (the suite runs on two pytest-xdist workers, so two
    launches may run at once), then `program`: a script and its arguments, by default the trainer."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
            *(program or ["-m", "ddpo_course.train"])]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

@pytest.fixture
def fresh_accelerate():
    "accelerate keeps one process-wide state: reset it around a test whose mixed precision differs from the others'."
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)

def small(run_dir, *extra): return load_config("tiny", [f"run.dir={run_dir}", *SMALL, *extra])

def unet_output(unet):
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad(): return unet(x, torch.tensor([500, 20]), e).sample

def record_log_ratios(monkeypatch) -> list[float]:
    "A list the trainer's loss fills, call by call, with the largest |log π_θ − log π_old| of the rows it is given."
    import ddpo_course.train as train_mod
    seen, original = [], train_mod.ddpo_loss
    def recording(log_prob, old_log_prob, *args, **kwargs):
        seen.append((log_prob - old_log_prob).detach().abs().max().item())
        return original(log_prob, old_log_prob, *args, **kwargs)
    monkeypatch.setattr(train_mod, "ddpo_loss", recording)
    return seen

def test_full_finetune_one_process(tmp_path):
    trainer = DDPOTrainer(small(tmp_path/"run", "train.epochs=2", "train.log_kl_ref=false"))
    metrics = trainer.train()
    assert [m["epoch"] for m in metrics] == [0, 1] and metrics[-1]["global_step"] == 2 * 2   # 2 minibatches per epoch
    assert not hasattr(trainer, "ref_unet") and "kl_ref" not in metrics[0]                    # unlogged: no reference copy
    from diffusers import StableDiffusionPipeline
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path/"run"/"final")
    torch.testing.assert_close(unet_output(reloaded.unet), unet_output(trainer.acc.unwrap_model(trainer.unet)), rtol=0, atol=0)
    assert not same_weights(reloaded.unet, load_pipeline("tiny").unet)
    for f in ("metrics.jsonl", "reward_curve.png", "config.yaml", "samples/eval-epoch-0000.png", "samples/eval-epoch-0001.png"):
        assert (tmp_path/"run"/f).exists(), f

@pytest.mark.parametrize("alpha,precision", [("null", "no"), ("16", "no"), ("null", "bf16")])   # alpha != rank: the scale must survive the export
def test_lora_one_process(tmp_path, alpha, precision, fresh_accelerate):
    """LoRA end to end. Under bf16 the frozen base UNet is stored in bf16 but the trained adapters must stay fp32 (the
    optimizer's master weights) and be exported exactly; the reloaded fp32 pipeline then matches to bf16 precision."""
    trainer = DDPOTrainer(small(tmp_path/"run", "train.epochs=2", "model.lora=true", "model.lora_rank=4", f"model.lora_alpha={alpha}",
                                f"model.mixed_precision={precision}"))
    trainer.train()
    trained = trainer.acc.unwrap_model(trainer.unet)
    assert all(p.dtype == torch.float32 for p in trainer.params) and all("lora" in n for n, p in trained.named_parameters() if p.requires_grad)
    ck = latest_checkpoint(tmp_path/"run")
    assert (ck/"unet_lora.safetensors").exists() and not (ck/"model.safetensors").exists()   # adapters only
    pipe = load_pipeline("tiny")
    before = unet_output(pipe.unet)
    pipe.load_lora_weights(tmp_path/"run"/"final")
    after = unet_output(pipe.unet)
    exact = precision == "no"
    torch.testing.assert_close(after, unet_output(trained), rtol=1e-5 if exact else 0.05, atol=1e-6 if exact else 0.05)
    assert (after - before).abs().max() > 0
    saved = load_file(str(tmp_path/"run"/"final"/"pytorch_lora_weights.safetensors"))
    adapters = [p for n, p in trained.named_parameters() if p.requires_grad]
    assert len(saved) == len(adapters) and all(v.dtype == torch.float32 for v in saved.values())
    assert sorted(v.double().sum().item() for v in saved.values()) == sorted(p.detach().double().sum().item() for p in adapters)

def test_bf16_autocast_on_cpu_full_finetune(tmp_path, fresh_accelerate):
    "The bf16 path on a CPU: the UNet computes in bf16 under autocast, its weights and their updates stay fp32."
    trainer = DDPOTrainer(small(tmp_path/"run", "train.epochs=1", "model.mixed_precision=bf16"))
    metrics = trainer.train()
    unet = trainer.acc.unwrap_model(trainer.unet)
    assert all(p.dtype == torch.float32 for p in unet.parameters()) and metrics[-1]["global_step"] == 2
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics[-1].items() if isinstance(v, float))
    assert not same_weights(unet, load_pipeline("tiny").unet)
    seen = []
    hook = unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with trainer.acc.autocast(): unet_output(unet)
    hook.remove()
    assert seen == [torch.bfloat16]                    # the compute dtype under the trainer's autocast

def test_global_batch_size_sets_the_optimizer_steps_per_epoch(tmp_path):
    "8 trajectories per epoch in minibatches of 4: 2 steps per epoch by default, 1 with a global batch of 8."
    metrics = DDPOTrainer(small(tmp_path/"run", "train.epochs=2", "train.global_batch_size=8", "train.log_kl_ref=false")).train()
    assert [m["global_step"] for m in metrics] == [1, 2]

def weights_log(run_dir, rank): return [json.loads(l) for l in (Path(run_dir)/f"weights-rank{rank}.jsonl").read_text().splitlines()]

@pytest.mark.parametrize("lora,method", [(False, "is"), (True, "is"), (False, "nft")])
def test_two_processes_save_resume_identical_ranks(tmp_path, lora, method):
    run = tmp_path/"run"
    args = ["tiny", f"run.dir={run}", *SMALL, "run.checkpoint_every=1", "run.record_weights=true", "train.batch_size=2",
            f"model.lora={str(lora).lower()}", f"train.method={method}", *(["run.snr_every=1"] if method == "nft" else [])]
    subprocess.run(launch() + args + ["train.epochs=2"], env=ENV, check=True, timeout=600, capture_output=True)
    subprocess.run(launch() + args + ["train.epochs=3", "run.resume=true"], env=ENV, check=True, timeout=600, capture_output=True)
    r0, r1 = weights_log(run, 0), weights_log(run, 1)
    assert len(r0) == 3 * 2 and r0 == r1          # 2 minibatches per process per epoch, identical after every step
    assert len({r["sum"] for r in r0}) == len(r0)  # and the weights did change at every step
    assert [m["epoch"] for m in read_metrics(run)] == [0, 1, 2]
    if method == "nft": assert all(-1 <= m["grad_cos"] <= 1 and -1 <= m["grad_cos_layers"] <= 1 and "nft_shift" in m
                                   for m in read_metrics(run))   # all-reduced over ranks
    d0, d1 = draws_log(run, 0), draws_log(run, 1)   # but each process sampled its own prompts and noise, every epoch
    assert [d["epoch"] for d in d0] == [d["epoch"] for d in d1] == [0, 1, 2]
    assert all(a["noise_sum"] != b["noise_sum"] and a["noise_sq"] != b["noise_sq"] for a, b in zip(d0, d1)), (d0, d1)
    assert any(a["prompts"] != b["prompts"] for a, b in zip(d0, d1)), "both processes drew the same prompts every epoch"
    assert len({d["noise_sum"] for d in d0}) == 3          # and fresh noise every epoch, resumed epoch 2 included

def draws_log(run_dir, rank): return [json.loads(l) for l in (Path(run_dir)/f"draws-rank{rank}.jsonl").read_text().splitlines()]

def final_weights(run_dir):
    "Every tensor the run saved in final/ (the UNet of a full fine-tune, or the LoRA file), by file and name."
    files = sorted((Path(run_dir)/"final").rglob("*.safetensors"))
    assert files, f"no weights in {run_dir}/final"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}

def kill_after_checkpoint(cmd, run_dir, name="epoch-0001"):
    """Start `cmd`, SIGKILL its whole process group the moment checkpoint `name` is promoted (the run is then working on
    the next epoch), and return. Waits on that event, not on a clock, so a fast machine cannot finish the run first."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (Path(run_dir)/"checkpoints"/name).exists():
        assert proc.poll() is None and time.time() < deadline, f"run ended or stalled before checkpoint {name}"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    assert latest_checkpoint(run_dir).name == name and not (Path(run_dir)/"final").exists()

@pytest.mark.parametrize("processes,lora,method", [(1, False, "is"), (1, True, "is"), (2, False, "is"), (1, False, "nft")])
def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(tmp_path, processes, lora, method):
    """A run killed right after its second checkpoint and resumed ends with exactly the weights of the same run left
    alone: one process (full and LoRA, whose resume must reload the adapters; DiffusionNFT, whose noise draws must
    repeat) and two (each rank's RNG and prompt stream)."""
    start = launch() if processes == 2 else [sys.executable, "-m", "ddpo_course.train"]
    args = start + ["tiny", *SMALL, "train.epochs=3", "run.checkpoint_every=1", f"model.lora={str(lora).lower()}", f"train.method={method}",
                    *(["train.batch_size=2", "train.global_batch_size=8"] if processes > 1 else [])]   # 2 minibatches of 2 per rank per step
    subprocess.run(args + [f"run.dir={tmp_path/'a'}"], env=ENV, check=True, timeout=600, capture_output=True)
    kill_after_checkpoint(args + [f"run.dir={tmp_path/'b'}"], tmp_path/"b")
    subprocess.run(args + [f"run.dir={tmp_path/'b'}", "run.resume=true"], env=ENV, check=True, timeout=600, capture_output=True)
    a, b = final_weights(tmp_path/"a"), final_weights(tmp_path/"b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["epoch"] for m in read_metrics(tmp_path/"b")] == list(range(3))
    assert [m["global_step"] for m in read_metrics(tmp_path/"b")] == ([1, 2, 3] if processes > 1 else [2, 4, 6])
    assert [m["reward_mean"] for m in read_metrics(tmp_path/"a")] == [m["reward_mean"] for m in read_metrics(tmp_path/"b")]

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

def test_non_finite_loss_stops_the_run(tmp_path):
    trainer = DDPOTrainer(small(tmp_path/"run", "train.epochs=3", "train.learning_rate=1e30", "train.max_grad_norm=1e30"))
    with pytest.raises(TrainingError, match="non-finite (loss|gradient)"): trainer.train()

def with_loss_scaler(trainer, overflows):
    "fp16's GradScaler on the CPU (accelerate gives none there), and a gradient that overflows in `overflows` backward passes."
    from accelerate.optimizer import AcceleratedOptimizer
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trainer.acc.scaler, trainer.opt = scaler, AcceleratedOptimizer(trainer.opt.optimizer, device_placement=False, scaler=scaler)
    trainer.acc.unscale_gradients = lambda optimizer=None: scaler.unscale_(trainer.opt.optimizer)
    calls = [0]
    def overflow(g):
        calls[0] += 1
        return g * float("inf") if calls[0] <= overflows else g
    trainer.params[0].register_hook(overflow)
    return scaler

def test_fp16_overflow_skips_the_step_and_lowers_the_loss_scale(tmp_path):
    trainer = DDPOTrainer(small(tmp_path/"run", "train.epochs=2", "sample.num_steps=2", "train.batch_size=8")).setup()
    before = [p.detach().clone() for p in trainer.params]
    scaler = with_loss_scaler(trainer, overflows=trainer.n_train_steps)   # every micro-step of the first optimizer step
    metrics = trainer.train()                           # 2 epochs of 1 optimizer step each: the first skipped
    assert scaler.get_scale() == 2.0**15                # halved once, by the one skipped step
    assert all(torch.isfinite(p).all() for p in trainer.params) and metrics[0]["grad_norm"] == 0 and metrics[1]["grad_norm"] > 0
    assert any((p != b).any() for p, b in zip(trainer.params, before))   # the second step was taken

def test_fp16_overflow_that_persists_stops_the_run(tmp_path, monkeypatch):
    import ddpo_course.train as train_mod
    monkeypatch.setattr(train_mod, "MAX_OVERFLOWS", 3)
    trainer = DDPOTrainer(small(tmp_path/"run", "train.epochs=5", "sample.num_steps=2", "train.batch_size=8")).setup()
    with_loss_scaler(trainer, overflows=10**6)
    with pytest.raises(TrainingError, match=r"overflowed in 3 optimizer steps in a row \(loss scale now 1.64e\+04\)"): trainer.train()

BAD = [
    ("sample.eta=0", "sample.eta=0.0: must be > 0"),
    ("sample.eta=-1", "sample.eta=-1.0: must be > 0"),
    ("train.clip_range=0", "train.clip_range=0.0: must be > 0"),
    ("sample.batch_size=5", "sample.batch_size=5: must divide the samples per process"),
    ("train.batch_size=3", "train.batch_size=3: must divide the samples per process"),
    ("sample.samples_per_epoch=33", "sample.batch_size=16: must divide"),
    ("train.timestep_fraction=0", "train.timestep_fraction=0.0: must be in (0, 1]"),
    ("train.timestep_fraction=1.01", "train.timestep_fraction=1.01: must be in (0, 1]"),
    ("reward.name=beauty", "reward.name='beauty': unknown reward"),
    ("reward.prompts=pokemon", "reward.prompts='pokemon': not a prompt set"),
    ("run.trackers=[mlflow]", "unknown tracker 'mlflow'"),
    ("model.name=./no/such/model", "model.name='./no/such/model'"),
    ("train.learning_rate=fast", "train.learning_rate='fast': expected a number"),
]

@pytest.mark.parametrize("override,message", BAD)
def test_bad_config_value_fails_before_anything_loads(tmp_path, capsys, override, message):
    t0 = time.time()
    assert main(["tiny", f"run.dir={tmp_path/'run'}", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path/"run").exists() and time.time() - t0 < 5

def test_unknown_preset(capsys):
    assert main(["sd3_turbo"]) == 2 and "not a preset" in capsys.readouterr().err

def test_samples_not_divisible_by_processes():
    from ddpo_course.config import ConfigError, validate
    with pytest.raises(ConfigError, match="divisible by the number of processes"): validate(load_config("tiny", ["sample.samples_per_epoch=33"]), 2)

def test_existing_run_is_never_overwritten_by_accident(tmp_path, capsys):
    run = tmp_path/"run"; run.mkdir(); (run/"metrics.jsonl").write_text('{"epoch": 0}\n')
    assert main(["tiny", f"run.dir={run}"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run/"metrics.jsonl").read_text() == '{"epoch": 0}\n'

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

def test_groups_held_out_prompts_and_diversity_two_processes(tmp_path):
    run = tmp_path/"run"
    args = ["tiny", f"run.dir={run}", *SMALL, "train.batch_size=2", "train.epochs=2", "run.eval_every=1",
            "sample.images_per_prompt=2", "train.advantages=group", "reward.heldout=heldout_animals", "reward.heldout_samples=4"]
    subprocess.run(launch() + args, env=ENV, check=True, timeout=600, capture_output=True)   # a split group would stop the run
    m = read_metrics(run)
    assert [r["epoch"] for r in m] == [0, 1]
    for r in m:
        assert r["diversity"] > 0 and r["diversity_prompt"] > 0 and isinstance(r["heldout_reward"], float)
    assert "heldout_reward_before" in m[0] and (run/"samples"/"heldout-before.pt").exists()

def test_image_diversity():
    from ddpo_course.train import image_diversity
    same = torch.full((4, 8, 8, 3), 100, dtype=torch.uint8)
    assert image_diversity(same) == 0
    two = torch.stack([torch.zeros(8, 8, 3), torch.full((8, 8, 3), 255.)]).to(torch.uint8)
    assert abs(image_diversity(two) - 1.0) < 1e-6                                    # black against white: RMS distance 1
    pairs = torch.cat([two[:1], two[:1], two[1:], two[1:]])                           # groups of identical images
    assert image_diversity(pairs, 2) == 0 and image_diversity(pairs) > 0.6

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

def test_kill_between_metrics_and_checkpoint_loses_no_record(tmp_path):
    trainer = DDPOTrainer(small(tmp_path/"run", "train.epochs=3", "run.checkpoint_every=1"))
    save = trainer.save_checkpoint
    def dies_at_epoch_1(epoch):
        if epoch == 1: raise KeyboardInterrupt("killed before the checkpoint of epoch 1")
        return save(epoch)
    trainer.save_checkpoint = dies_at_epoch_1
    with pytest.raises(KeyboardInterrupt): trainer.train()
    assert [m["epoch"] for m in read_metrics(tmp_path/"run")] == [0, 1]     # epoch 1's record is there before its checkpoint
    assert latest_checkpoint(tmp_path/"run").name == "epoch-0000"
    metrics = DDPOTrainer(small(tmp_path/"run", "train.epochs=3", "run.checkpoint_every=1", "run.resume=true")).train()
    assert [m["epoch"] for m in metrics] == [0, 1, 2]                         # epoch 1 redone once, no duplicate line
    assert metrics[2]["checkpoint_s"] > 0 and metrics[0]["checkpoint_s"] == 0   # timed in the line after its checkpoint

def test_accumulation_inner_epochs_and_batch_baseline_together(tmp_path):
    # 8 samples, minibatches of 4: 2 per inner epoch, 2 inner epochs, accumulating 2 minibatches per step: 2 steps per epoch
    trainer = DDPOTrainer(small(tmp_path/"run", "train.epochs=2", "train.gradient_accumulation=2", "train.inner_epochs=2",
                                "train.advantages=batch"))
    metrics = trainer.train()
    assert [m["global_step"] for m in metrics] == [2, 4]
    assert all(m["kl_ref"] > 0 and m["approx_kl"] > 0 for m in metrics)     # the second inner epoch sees a moved policy

@pytest.mark.parametrize("per_call,calls_per_step", [("1", 2), ("all", 1)])
def test_ratio_is_one_at_the_first_micro_step_of_the_trainers_own_indexing(tmp_path, monkeypatch, per_call, calls_per_step):
    seen = record_log_ratios(monkeypatch)
    DDPOTrainer(small(tmp_path/"run", "train.epochs=1", "sample.num_steps=4", "train.timestep_fraction=0.5",
                      f"train.timesteps_per_call={per_call}")).train()
    accumulate = calls_per_step     # loss calls per minibatch (2 timesteps, one or both per call): the first optimizer step comes after them
    if per_call == "1":             # the UNet sees the batches it saw while sampling: the log-ratio is exactly 0
        assert max(seen[:accumulate]) == 0, seen[:accumulate]
    else:                           # two timesteps in one call: other float32 kernels (1e-6 at one thread), same weights
        assert max(seen[:accumulate]) < 1e-5, seen[:accumulate]
    assert min(seen[accumulate:]) > 1e-3, seen          # after the first step the policy has moved (by 0.06 to 0.6 here)

def test_reward_curve_panels_and_a_clear_error_for_too_few_axes(tmp_path):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ddpo_course.train import plot_reward_curve
    row = dict(epoch=0, reward_mean=1.0, reward_std=0.1, monitor_gold_mean=2.0, monitor_gold_std=0.2, diversity=0.3, eval_reward=1.1)
    (tmp_path/"metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "epoch": 1}) + "\n")
    axs = plot_reward_curve(tmp_path)
    assert len(axs) == 3 and [a.get_ylabel() for a in axs] == ["reward", "gold (monitored)", "diversity (mean pairwise RMS)"]
    with pytest.raises(ValueError, match="2 Axes given, this run has 3 panels \\(reward, gold, diversity\\)"):
        plot_reward_curve(tmp_path, ax=plt.subplots(1, 2)[1])
    plt.close("all")

def test_scoring_in_a_thread_or_in_sequence_gives_the_same_epoch(tmp_path):
    out = {}
    for overlap in ("true", "false"):
        tr = DDPOTrainer(small(tmp_path/overlap, f"reward.overlap={overlap}", "sample.batch_size=2")).setup()
        traj, rewards, prompts, error, times = tr.sample_epoch(0)
        out[overlap] = (traj.latents, rewards, prompts)
    torch.testing.assert_close(out["true"][0], out["false"][0], rtol=0, atol=0)
    torch.testing.assert_close(out["true"][1], out["false"][1], rtol=0, atol=0)
    assert out["true"][2] == out["false"][2] and error is None

@pytest.mark.parametrize("lora", [False, True])
def test_fused_timesteps_give_the_gradient_of_one_call_per_timestep(tmp_path, lora):
    # 8 trajectories, one minibatch, guidance and the KL penalty on: the first optimizer step's gradient, 1 or all trained timesteps per call
    grads, counts = {}, {}
    for k in ("1", "all"):
        tr = DDPOTrainer(small(tmp_path/k, "train.batch_size=8", f"train.timesteps_per_call={k}", "train.max_grad_norm=1e9",
                               "train.kl_coef=0.5", f"model.lora={str(lora).lower()}")).setup()
        assert tr.cfg.sample.guidance_scale > 1
        traj, rewards, *_ = tr.sample_epoch(0)
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

NOT_SHARED = '''
import os, sys
import ddpo_course.train as train_mod
if os.environ.get("RANK") == "1": train_mod._sees = lambda path, token: False    # as if on another machine's disk
sys.exit(train_mod.main(sys.argv[1:]))
'''

def test_a_run_folder_not_shared_by_every_process_stops_all_before_any_work(tmp_path):
    script, run = tmp_path/"run_not_shared.py", tmp_path/"run"
    script.write_text(NOT_SHARED)
    out = subprocess.run(launch(str(script)) + ["tiny", f"run.dir={run}", *SMALL, "train.batch_size=2"],
                         env=ENV, timeout=300, capture_output=True, text=True)
    assert out.returncode != 0 and "is not the same folder for every process: process(es) [1] do not see" in out.stderr, out.stderr[-2000:]
    assert not (run/"metrics.jsonl").exists() and not (run/"checkpoints").exists() and not (run/".shared-check").exists()

def _recording(monkeypatch, name, keep):
    "Replace `ddpo_course.train.<name>` by a wrapper that appends `keep(*args)` to a list before calling it; the list."
    import ddpo_course.train as tr
    real, seen = getattr(tr, name), []
    def wrapper(*args, **kw): seen.append(keep(*args)); return real(*args, **kw)
    monkeypatch.setattr(tr, name, wrapper)
    return seen

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

def test_gradient_snr_is_logged_per_step_when_asked(tmp_path):
    m = DDPOTrainer(small(tmp_path/"run", "train.epochs=2", "run.snr_every=2", "train.timesteps=first",
                          "train.timestep_fraction=0.5")).train()
    assert len(m[0]["grad_cos_t"]) == 4 and all(-1 <= c <= 1 for c in m[0]["grad_cos_t"]) and -1 <= m[0]["grad_cos"] <= 1
    assert -1 <= m[0]["grad_cos_layers"] <= 1 and m[0]["grad_cos_layers"] != m[0]["grad_cos"]   # a different mean of the same gradients
    assert all(n > 0 for n in m[0]["grad_norm_t"]) and "grad_cos_t" not in m[1]      # epoch 1 is not a multiple of 2

def test_per_step_clip_fraction_log_ratio_and_kl_are_logged_for_the_trained_steps(tmp_path):
    # 8 samples in 2 optimizer steps of 4, so the second step's ratios move; the noisiest 2 of 4 steps trained, with a KL penalty
    m = DDPOTrainer(small(tmp_path/"run", "train.epochs=2", "train.timesteps=first", "train.timestep_fraction=0.5",
                          "train.gradient_accumulation=1", "train.kl_coef=0.1", "train.clip_range=1e-6")).train()
    for r in m:
        assert len(r["clipfrac_t"]) == len(r["abs_log_ratio_t"]) == len(r["kl_ref_t"]) == 4
        assert r["clipfrac_t"][2:] == r["abs_log_ratio_t"][2:] == r["kl_ref_t"][2:] == [None, None]   # untrained steps
        assert all(0 <= c <= 1 for c in r["clipfrac_t"][:2]) and all(x >= 0 for x in r["abs_log_ratio_t"][:2] + r["kl_ref_t"][:2])
        assert abs(sum(r["clipfrac_t"][:2]) / 2 - r["clipfrac"]) < 1e-6       # equal rows per step: their mean is the epoch's
    assert max(m[1]["abs_log_ratio_t"][:2]) > 0 and max(m[1]["clipfrac_t"][:2]) > 0 and max(m[1]["kl_ref_t"][:2]) > 0

def test_evaluation_is_judged_pair_by_pair_against_before_training(tmp_path, capsys):
    "On shape-world prompts: win rates of the trained and monitored rewards, and the independent judge's aligned share."
    prompts = "[a red circle on a white background, a blue square on a black background, a yellow cross on a gray background]"
    cfg = load_config("cpu", [f"run.dir={tmp_path/'run'}", "train.epochs=2", "sample.samples_per_epoch=8", "sample.batch_size=8",
                              "train.batch_size=8", "train.global_batch_size=8", "run.trackers=[]", "run.progress=false",
                              "run.eval_every=1", f"run.eval_prompts={prompts}"])
    trainer = DDPOTrainer(cfg); m = trainer.train()
    last = m[-1]
    assert {"eval_win_reward", "eval_win_gold", "eval_win_alignment", "eval_aligned", "eval_aligned_before"} <= set(last)
    assert all(abs(3 * v - round(3 * v)) < 1e-6 for k, v in last.items() if k.startswith(("eval_win_", "eval_aligned")))   # shares of 3 pairs
    from ddpo_course.train import pair_wins
    before = trainer.pair_scores(torch.load(tmp_path/"run"/"samples"/"eval-before.pt"), cfg.run.eval_prompts)
    final = trainer.pair_scores(torch.load(tmp_path/"run"/"samples"/"eval-epoch-0001.pt"), cfg.run.eval_prompts)
    assert pair_wins(final, before) == {k: v for k, v in last.items() if k.startswith("eval_win_") or k.startswith("eval_aligned")}
    out = capsys.readouterr().out
    assert "final against before, pair by pair on 3 evaluation pairs: toy_aesthetic wins" in out
    rss = float(re.search(r"done in \d+\.\d min, peak memory \(RSS\) (\d+) MiB per process", out)[1])   # the run's last message
    assert rss > 100 and all(r["peak_rss_mb"] <= rss + 1 for r in m)   # a high-water mark: no epoch's is above the end's

@pytest.mark.parametrize("overrides,message", [
    (["train.method=ppo"], "train.method='ppo': use 'is'"),
    (["train.method=nft", "train.nft_beta=0"], "train.nft_beta=0.0: must be > 0"),
    (["train.method=nft", "train.nft_t_min=1000"], "train.nft_t_min=1000: must be a timestep in [0, 999]"),
    (["train.method=nft", "train.kl_coef=0.1"], "train.kl_coef=0.1: is a penalty on DDPO's reverse steps"),
    (["train.method=nft", "train.timesteps=first"], "train.timesteps='first': selects DDPO's denoising steps")])
def test_bad_nft_settings_fail_before_anything_loads(tmp_path, capsys, overrides, message):
    assert main(["tiny", f"run.dir={tmp_path/'run'}", *overrides]) == 2
    assert message in capsys.readouterr().err and not (tmp_path/"run").exists()

def test_nft_fused_draws_give_the_gradient_of_one_call_per_draw(tmp_path):
    "train.method=nft: the noise draws of a minibatch in one UNet call or one per call, the same first gradient."
    grads, counts = {}, {}
    for k in ("1", "all"):
        tr = DDPOTrainer(small(tmp_path/k, "train.batch_size=8", "train.method=nft", f"train.timesteps_per_call={k}",
                               "train.max_grad_norm=1e9")).setup()
        assert not hasattr(tr, "ref_unet")                 # no reverse step to compare: no reference copy
        traj, rewards, *_ = tr.sample_epoch(0)
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
        traj, rewards, *_ = tr.sample_epoch(0)
        ts = []
        h = tr.acc.unwrap_model(tr.unet).register_forward_pre_hook(lambda mod, args: ts.append(args[1].detach().clone()))
        tr.train_epoch(0, traj, torch.linspace(-1, 1, len(rewards)))
        h.remove(); seen[t_min] = torch.cat(ts)
    assert seen[900].min() >= 900 and seen[900].max() <= 999 and len(seen[900]) == len(seen[0])
    assert seen[0].min() < 900

def test_nft_logs_its_gradient_signal_to_noise_and_its_shift(tmp_path):
    m = DDPOTrainer(small(tmp_path/"run", "train.epochs=2", "train.method=nft", "run.snr_every=1")).train()
    assert all(-1 <= r["grad_cos"] <= 1 and -1 <= r["grad_cos_layers"] <= 1 and r["grad_norm_trained"] > 0 for r in m)
    assert "grad_cos_t" not in m[0]
    assert "clipfrac" not in m[0] and m[0]["nft_shift"] > 0 and m[1]["global_step"] == 4

def test_channels_last_is_the_same_run_on_other_kernels(tmp_path, monkeypatch):
    "model.channels_last: the UNet's weights in channels-last format, the replay still exact, the run the plain one's up to rounding."
    seen = record_log_ratios(monkeypatch)
    runs = {}
    for cl in ("false", "true"):
        seen.clear()
        tr = DDPOTrainer(small(tmp_path/cl, "train.epochs=2", "sample.num_steps=4", "train.timestep_fraction=0.5",
                               "train.timesteps_per_call=1", f"model.channels_last={cl}"))
        runs[cl] = tr.train()
        assert tr.acc.unwrap_model(tr.unet).conv_in.weight.is_contiguous(memory_format=torch.channels_last) == (cl == "true")
        assert seen[:2] == [0.0, 0.0], seen[:2]       # the batches sampling saw, on the same kernels: log-ratio exactly 0
    for a, b in zip(runs["false"], runs["true"]):  # the same samples and updates, up to float32 rounding (which Adam then grows)
        assert abs(a["reward_mean"] - b["reward_mean"]) < 1e-4, (a, b)   # 3e-8 in epoch 0, 3e-6 in epoch 1 measured
    a, b = runs["false"][0]["approx_kl"], runs["true"][0]["approx_kl"]    # log-probs after the first steps: 0.3% apart measured
    assert abs(a - b) < 1e-2 * a, (a, b)
