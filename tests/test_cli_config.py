"""Configuration and command lines: every bad value is refused before anything loads, with the field and the fix;
presets and batch sizes resolve as documented; the benchmark commands run from a shell at small sizes (their figures
are not asserted: CI machines differ)."""
import json, os, subprocess, time

import pytest

from ddpo_course.config import ConfigError, load_config, validate
from ddpo_course.train import DDPOTrainer, main
from conftest import small

BENCH_ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

def run(*args, cwd):
    return subprocess.run(list(args), capture_output=True, text=True, env=BENCH_ENV, cwd=cwd, timeout=600)

def exit_code(fn, argv, cwd, monkeypatch) -> int:
    "The exit status of a console-script entry point called in this process, in `cwd`."
    monkeypatch.chdir(cwd)
    try: return fn(argv)
    except SystemExit as e: return e.code


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
    ("train.learning_rate=.inf", "train.learning_rate=inf: must be a finite number > 0"),
    ("train.learning_rate=0", "train.learning_rate=0.0: must be a finite number > 0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0: must be a finite number > 0 (a negative one reverses"),
    ("train.max_grad_norm=0", "train.max_grad_norm=0.0: must be a finite number > 0"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1: must be a finite number >= 0"),
    ("train.adam_beta1=1", "train.adam_beta1=1.0: must be in [0, 1)"),
    ("train.adam_beta2=-0.5", "train.adam_beta2=-0.5: must be in [0, 1)"),
    ("train.adam_eps=0", "train.adam_eps=0.0: must be a finite number > 0"),
    ("sample.guidance_scale=0.5", "sample.guidance_scale=0.5: must be a finite number >= 1"),
    ("model.lora_alpha=0", "model.lora_alpha=0.0: must be a number > 0"),
    ("run.eval_prompts=[]", "run.eval_prompts=[]: is empty"),
    ("run.dir=", "run.dir='': is empty"),
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

@pytest.mark.parametrize("overrides,message", [
    (["train.method=ppo"], "train.method='ppo': use 'is'"),
    (["train.method=nft", "train.nft_beta=0"], "train.nft_beta=0.0: must be > 0"),
    (["train.method=nft", "train.nft_t_min=1000"], "train.nft_t_min=1000: must be a timestep in [0, 999]"),
    (["train.method=nft", "train.timesteps=first"], "train.timesteps='first': selects DDPO's denoising steps")])
def test_bad_nft_settings_fail_before_anything_loads(tmp_path, capsys, overrides, message):
    assert main(["tiny", f"run.dir={tmp_path/'run'}", *overrides]) == 2
    assert message in capsys.readouterr().err and not (tmp_path/"run").exists()

def test_global_batch_size_sets_the_optimizer_steps_per_epoch(tmp_path):
    "8 trajectories per epoch in minibatches of 4: 2 steps per epoch by default, 1 with a global batch of 8."
    metrics = DDPOTrainer(small(tmp_path/"run", "train.epochs=2", "train.global_batch_size=8", "train.log_kl_ref=false")).train()
    assert [m["global_step"] for m in metrics] == [1, 2]

def test_monitor_must_name_known_rewards():
    with pytest.raises(ConfigError, match="reward.monitor"): validate(load_config("cpu", ["reward.monitor=[gold, beauty]"]))
    validate(load_config("cpu", ["run.dir=/nonexistent/run"]))   # the embedded default itself is valid


def test_ddpo_bench_small(tmp_path):
    r = run("ddpo-bench", "--small", "--out", "b.json", "--plot", "s.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sampling overhead" in r.stdout and "training (LoRA) overhead" in r.stdout and "peak RSS" in r.stdout
    assert "epoch overhead" in r.stdout                          # the whole epoch against the same work done plainly
    res = json.loads((tmp_path/"b.json").read_text())
    assert res["small"] and len(res["sampling"]["ours_s"]) == 5 and len(res["training"]) == 2 and res["epoch_vs_bare"]["ratio"] > 0
    assert {"sampling_s", "decoding_s", "training_s", "checkpoint_s"} <= set(res["epoch"])
    assert (tmp_path/"s.png").stat().st_size > 0
    assert "DDPO:" not in r.stdout   # trainer log lines go to stderr, the table alone to stdout

@pytest.mark.parametrize("args, message", [
    (["--repeats", "3"], "at least 5 timed repeats"),
    (["--eta", "0"], "must be > 0"),
    (["--steps", "0"], "--steps 0: must be a positive integer"),
    (["--samples", "10", "--train-batch-size", "4"], "not divisible by --train-batch-size 4"),
])
def test_ddpo_bench_bad_args(tmp_path, monkeypatch, capsys, args, message):
    from ddpo_course.bench import main   # in-process: the console script's wiring is covered by test_ddpo_bench_small
    assert exit_code(main, [*args, "--out", "b.json"], tmp_path, monkeypatch) == 2
    err = capsys.readouterr().err
    assert message in err, err[-2000:]
    assert not (tmp_path/"b.json").exists()

def test_ddpo_bench_gpu_tiny_on_cpu(tmp_path):
    r = run("ddpo-bench-gpu", "--model", "tiny", "--resolution", "32", "--steps", "2", "--samples", "2", "--sample-batch", "2",
            "--train-batch", "1", "--precision", "no", "--repeats", "1", "--out", "g.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path/"g.json").read_text())
    assert [m["mode"] for m in res["modes"]] == ["full", "lora"]
    assert all(m["images_per_s"] > 0 and m["trajectories_per_s"] > 0 for m in res["modes"])
    assert "s/trajectory" in r.stdout

@pytest.mark.parametrize("args, message", [
    (["--resolution", "500"], "multiple of 64"),
    (["--samples", "32", "--train-batch", "5"], "train_batch=5: must be a positive divisor"),
    (["--modes", "full,qlora"], "use 'full' and/or 'lora'"),
])
def test_ddpo_bench_gpu_bad_args(tmp_path, monkeypatch, capsys, args, message):
    from ddpo_course.bench_gpu import main as gpu_main   # in-process: the wiring is covered by test_ddpo_bench_gpu_tiny_on_cpu
    assert exit_code(gpu_main, list(args), tmp_path, monkeypatch) == 2
    err = capsys.readouterr().err
    assert message in err, err[-2000:]

def test_ddpo_bench_levers_small(tmp_path, monkeypatch, capsys):
    "ddpo-bench --levers --small: the UNet call under CPU settings, each row with its ratio to plain and its utilisation."
    import ddpo_course.bench as bench
    monkeypatch.setattr(bench, "LEVERS", {k: bench.LEVERS[k] for k in ("plain", "1 timestep per call")})   # two, for time
    assert exit_code(bench.main, ["--levers", "--small", "--out", "l.json"], tmp_path, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "utilisation is against the fp32 peak" in out and "1 timestep per call" in out
    res = json.loads((tmp_path/"l.json").read_text())
    assert list(res["levers"]) == ["plain", "1 timestep per call"] and res["peak_tflops"]["float32"] > 0
    assert all(0 < v["utilisation"] < 1 for kinds in res["levers"].values() for v in kinds.values())

