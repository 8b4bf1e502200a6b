"""The training job end to end on the tiny offline pipeline: one and two processes, LoRA and full fine-tuning, exact
resume after SIGKILL, non-finite losses and fp16 overflows, checkpoints and records that a kill cannot lose, and what
each epoch logs."""
import json, os, re, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpo_course.models import load_pipeline, same_weights
from ddpo_course.runlog import latest_checkpoint, read_metrics
from ddpo_course.config import load_config
from ddpo_course.train import DDPOTrainer, TrainingError
from conftest import ENV, SMALL, launch, run_ok, small, unet_output

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


def weights_log(run_dir, rank): return [json.loads(l) for l in (Path(run_dir)/f"weights-rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora,method", [(False, "is"), (True, "is"), (False, "nft")])
def test_two_processes_save_resume_identical_ranks(tmp_path, lora, method):
    run = tmp_path/"run"
    args = ["tiny", f"run.dir={run}", *SMALL, "run.checkpoint_every=1", "run.record_weights=true", "train.batch_size=2",
            f"model.lora={str(lora).lower()}", f"train.method={method}", *(["run.snr_every=1"] if method == "nft" else [])]
    run_ok(launch() + args + ["train.epochs=2"])
    run_ok(launch() + args + ["train.epochs=3", "run.resume=true"])
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
    run_ok(args + [f"run.dir={tmp_path/'a'}"])
    kill_after_checkpoint(args + [f"run.dir={tmp_path/'b'}"], tmp_path/"b")
    run_ok(args + [f"run.dir={tmp_path/'b'}", "run.resume=true"])
    a, b = final_weights(tmp_path/"a"), final_weights(tmp_path/"b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["epoch"] for m in read_metrics(tmp_path/"b")] == list(range(3))
    assert [m["global_step"] for m in read_metrics(tmp_path/"b")] == ([1, 2, 3] if processes > 1 else [2, 4, 6])
    assert [m["reward_mean"] for m in read_metrics(tmp_path/"a")] == [m["reward_mean"] for m in read_metrics(tmp_path/"b")]


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
    import ddpo_course.epoch as epoch_mod
    monkeypatch.setattr(epoch_mod, "MAX_OVERFLOWS", 3)
    trainer = DDPOTrainer(small(tmp_path/"run", "train.epochs=5", "sample.num_steps=2", "train.batch_size=8")).setup()
    with_loss_scaler(trainer, overflows=10**6)
    with pytest.raises(TrainingError, match=r"overflowed in 3 optimizer steps in a row \(loss scale now 1.64e\+04\)"): trainer.train()


def test_groups_held_out_prompts_and_diversity_two_processes(tmp_path):
    run = tmp_path/"run"
    args = ["tiny", f"run.dir={run}", *SMALL, "train.batch_size=2", "train.epochs=2", "run.eval_every=1",
            "sample.images_per_prompt=2", "train.advantages=group", "reward.heldout=heldout_animals", "reward.heldout_samples=4"]
    run_ok(launch() + args)   # a split group would stop the run
    m = read_metrics(run)
    assert [r["epoch"] for r in m] == [0, 1]
    for r in m:
        assert r["diversity"] > 0 and r["diversity_prompt"] > 0 and isinstance(r["heldout_reward"], float)
    assert "heldout_reward_before" in m[0] and (run/"samples"/"heldout-before.pt").exists()


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


def test_reward_curve_panels_and_a_clear_error_for_too_few_axes(tmp_path):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ddpo_course.runlog import plot_reward_curve
    row = dict(epoch=0, reward_mean=1.0, reward_std=0.1, monitor_gold_mean=2.0, monitor_gold_std=0.2, diversity=0.3, eval_reward=1.1)
    (tmp_path/"metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "epoch": 1}) + "\n")
    axs = plot_reward_curve(tmp_path)
    assert len(axs) == 3 and [a.get_ylabel() for a in axs] == ["reward", "gold (monitored)", "diversity (mean pairwise RMS)"]
    with pytest.raises(ValueError, match="2 Axes given, this run has 3 panels \\(reward, gold, diversity\\)"):
        plot_reward_curve(tmp_path, ax=plt.subplots(1, 2)[1])
    plt.close("all")


NOT_SHARED = '''
import os, sys
import ddpo_course.train as train_mod
import ddpo_course.runlog as runlog
if os.environ.get("RANK") == "1": runlog._sees = lambda path, token: False    # as if on another machine's disk
sys.exit(train_mod.main(sys.argv[1:]))
'''


def test_a_run_folder_not_shared_by_every_process_stops_all_before_any_work(tmp_path):
    script, run = tmp_path/"run_not_shared.py", tmp_path/"run"
    script.write_text(NOT_SHARED)
    out = subprocess.run(launch(str(script)) + ["tiny", f"run.dir={run}", *SMALL, "train.batch_size=2"],
                         env=ENV, timeout=300, capture_output=True, text=True)
    assert out.returncode != 0 and "is not the same folder for every process: process(es) [1] do not see" in out.stderr, out.stderr[-2000:]
    assert not (run/"metrics.jsonl").exists() and not (run/"checkpoints").exists() and not (run/".shared-check").exists()


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


def test_nft_logs_its_gradient_signal_to_noise_and_its_shift(tmp_path):
    m = DDPOTrainer(small(tmp_path/"run", "train.epochs=2", "train.method=nft", "run.snr_every=1")).train()
    assert all(-1 <= r["grad_cos"] <= 1 and -1 <= r["grad_cos_layers"] <= 1 and r["grad_norm_trained"] > 0 for r in m)
    assert "grad_cos_t" not in m[0]
    assert "clipfrac" not in m[0] and m[0]["nft_shift"] > 0 and m[1]["global_step"] == 4


@pytest.mark.parametrize("lora", [False, True])
def test_nft_kl_to_the_reference_holds_the_model_near_the_pretrained_one(tmp_path, lora):
    """DiffusionNFT's official recipe pulls ε_θ toward the pretrained ε_ref on its draws: with a strong pull, the
    trained model's output stays nearer the pretrained one's than without, and ‖ε_θ − ε_ref‖² is logged as kl_ref."""
    from ddpo_course.models import load_pipeline
    ref = unet_output(load_pipeline("tiny").unet)
    def after(coef):
        run = tmp_path/f"kl{coef}"
        m = DDPOTrainer(small(run, "train.epochs=6", "train.method=nft", f"train.kl_coef={coef}", "train.learning_rate=3e-3",
                              f"model.lora={str(lora).lower()}")).train()
        pipe = load_pipeline("tiny" if lora else run/"final")
        if lora: pipe.load_lora_weights(run/"final"); pipe.fuse_lora()
        return m, (unet_output(pipe.unet) - ref).pow(2).mean().item()
    (m0, d0), (m1, d1) = after(0), after(1000)
    assert "kl_ref" not in m0[0] and all(r["kl_ref"] > 0 for r in m1)
    assert d1 < 0.5 * d0, (d0, d1)



def test_sigterm_writes_a_checkpoint_and_exits_then_resumes(tmp_path):
    """What a cluster scheduler sends before preemption: the run ends the epoch it is in, writes that epoch's checkpoint
    (none was due: checkpoint_every is larger than the run) and exits with 143; the same command with run.resume=true
    then finishes it, every epoch once."""
    run = tmp_path/"run"
    args = [sys.executable, "-m", "ddpo_course.train", "tiny", *SMALL, "train.epochs=30", "run.checkpoint_every=100",
            f"run.dir={run}"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not read_metrics(run):
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before its first epoch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    ck, done = latest_checkpoint(run), read_metrics(run)
    assert "SIGTERM: stopped after epoch" in out and ck is not None and not (run/"final").exists()
    assert int(ck.name[6:]) == done[-1]["epoch"] < 29      # the checkpoint is the last epoch logged, long before the end
    run_ok(args[:-3] + ["train.epochs=" + str(done[-1]["epoch"] + 3), f"run.dir={run}", "run.resume=true",
                        "run.checkpoint_every=100"])
    assert [m["epoch"] for m in read_metrics(run)] == list(range(done[-1]["epoch"] + 3)) and (run/"final").exists()
