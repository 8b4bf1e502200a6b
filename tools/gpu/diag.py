"""Where an epoch's time goes on a GPU: the sampling phase split (per reward), and UNet calls timed alone.
python tools/gpu/diag.py"""
import sys, tempfile, time, statistics
import torch
from ddpo_course.bench import _bench_trainer, time_epoch
from ddpo_course.bench_gpu import sd15_pipeline
from ddpo_course.models import quiet_hf
quiet_hf(); torch.backends.cuda.matmul.allow_tf32 = True
d = tempfile.mkdtemp(); t0 = time.perf_counter()
pipe = sd15_pipeline(512); pipe.save_pretrained(f"{d}/model"); print(f"build+save {time.perf_counter()-t0:.1f} s", flush=True)
def sync(): torch.cuda.synchronize()
def timed(fn, n=5):
    fn(); sync(); ts = []
    for _ in range(n): t = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
for reward in ("cpu preset rewards", "brightness"):
    extra = [] if reward.startswith("cpu") else ["reward.name=brightness", "reward.monitor=[]"]
    tr = _bench_trainer(f"{d}/run-{len(extra)}", [f"model.name={d}/model", "model.mixed_precision=bf16", "sample.num_steps=10",
                        "sample.samples_per_epoch=16", "sample.batch_size=16", "train.batch_size=4", "train.timestep_fraction=1.0", *extra])
    for e in range(2):
        t = time.perf_counter(); times = tr.sample_epoch(e).times; sync()
        print(f"{reward}: sample_epoch {time.perf_counter()-t:.2f} s", {k: round(v, 3) for k, v in times.items()}, flush=True)
unet = tr.acc.unwrap_model(tr.unet)       # full fine-tuning: fp32 weights under bf16 autocast
c = torch.randn(64, 77, 768, device="cuda")
for rows in (32, 8, 16, 32, 64):
    x = torch.randn(rows, 4, 64, 64, device="cuda"); t = torch.full((rows,), 500, device="cuda")
    def fwd():
        with torch.no_grad(), tr.acc.autocast(): unet(x, t, c[:rows]).sample
    def fwdbwd():
        with tr.acc.autocast(): out = unet(x, t, c[:rows]).sample
        out.float().square().mean().backward()
    print(f"rows {rows}: forward {1e3*timed(fwd):.1f} ms ({1e3*timed(fwd)/rows:.2f}/row), forward+backward {1e3*timed(fwdbwd, 3):.1f} ms ({1e3*timed(fwdbwd, 3)/rows:.2f}/row)", flush=True)
unet.zero_grad(set_to_none=True)
ub = unet.to(torch.bfloat16)   # bf16 weights, no autocast: what sampling could use
x = torch.randn(32, 4, 64, 64, device="cuda", dtype=torch.bfloat16); t = torch.full((32,), 500, device="cuda")
def fwd_bf16():
    with torch.no_grad(): ub(x, t, c[:32].bfloat16()).sample
print(f"bf16 weights, rows 32: forward {1e3*timed(fwd_bf16):.1f} ms", flush=True)
ub = ub.to(memory_format=torch.channels_last)
print(f"bf16 weights, channels_last, rows 32: forward {1e3*timed(fwd_bf16):.1f} ms", flush=True)
