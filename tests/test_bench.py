"The benchmark commands run from a shell at small sizes (figures are not asserted: CI machines differ)."
import json, os, subprocess, sys
import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}

def run(*args, cwd):
    return subprocess.run(list(args), capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)

def exit_code(fn, argv, cwd, monkeypatch) -> int:
    "The exit status of a console-script entry point called in this process, in `cwd`."
    monkeypatch.chdir(cwd)
    try: return fn(argv)
    except SystemExit as e: return e.code

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
    from ddpo_course.bench import gpu_main   # in-process: the wiring is covered by test_ddpo_bench_gpu_tiny_on_cpu
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
