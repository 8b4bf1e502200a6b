"""Profile one DDPO epoch of Stable Diffusion 1.5's architecture (random weights) on a GPU.

python tools/gpu/profile_epoch.py OUT_DIR [--steps 10] [--samples 16] [--sample-batch 16] [--train-batch 4] [--lora] [overrides...]
Prints the kernels and host ops that take the most time, the GPU's busy fraction, and writes a Chrome trace."""
import argparse, gzip, json, shutil, sys, tempfile, time
from pathlib import Path
import torch
from torch.profiler import ProfilerActivity, profile
from ddpo_course.bench import _bench_trainer, time_epoch
from ddpo_course.bench_gpu import sd15_pipeline
from ddpo_course.models import quiet_hf

p = argparse.ArgumentParser()
p.add_argument("out"); p.add_argument("--steps", type=int, default=10); p.add_argument("--samples", type=int, default=16)
p.add_argument("--sample-batch", type=int, default=16); p.add_argument("--train-batch", type=int, default=4)
p.add_argument("--lora", action="store_true"); p.add_argument("--resolution", type=int, default=512)
p.add_argument("overrides", nargs="*")
a = p.parse_args(); quiet_hf(); out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
d = tempfile.mkdtemp()
sd15_pipeline(a.resolution).save_pretrained(f"{d}/model")
tr = _bench_trainer(f"{d}/run", [f"model.name={d}/model", "model.mixed_precision=bf16", f"model.lora={a.lora}",
                    f"sample.num_steps={a.steps}", f"sample.samples_per_epoch={a.samples}", f"sample.batch_size={a.sample_batch}",
                    f"train.batch_size={a.train_batch}", "train.timestep_fraction=1.0", "train.inner_epochs=1", *a.overrides])
print("warm-up", time_epoch(tr, 0), flush=True)
print("timed  ", time_epoch(tr, 1), flush=True)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    t0 = time.perf_counter(); phases = time_epoch(tr, 2); wall = time.perf_counter() - t0
print("profiled", phases)
ka = prof.key_averages()
gpu_us = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA)
# busy time: union of kernel intervals on the device
iv = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
busy, cur = 0, None
for s, e in iv:
    if cur is None or s > cur[1]: busy += (cur[1] - cur[0]) if cur else 0; cur = [s, e]
    else: cur[1] = max(cur[1], e)
busy += (cur[1] - cur[0]) if cur else 0
print(f"wall {wall:.3f} s, device busy {busy/1e6:.3f} s ({100*busy/1e6/wall:.0f}%), device kernel time summed {gpu_us/1e6:.3f} s")
for key, n in (("self_cuda_time_total", 30), ("self_cpu_time_total", 30)):
    t = ka.table(sort_by=key, row_limit=n, max_name_column_width=70)
    print(t); (out/f"top_{key}.txt").write_text(t)
sync = [e for e in ka if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense", "cudaMemcpy", "aten::to", "aten::copy_")]
for e in sync: print(f"{e.key:<30} calls {e.count:>7} cpu total {e.cpu_time_total/1e3:9.1f} ms")
prof.export_chrome_trace(f"{d}/trace.json")
with open(f"{d}/trace.json", "rb") as f, gzip.open(out/"trace.json.gz", "wb", compresslevel=6) as g: shutil.copyfileobj(f, g)
print("trace", (out/"trace.json.gz").stat().st_size / 2**20, "MiB")
