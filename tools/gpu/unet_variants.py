"""SD 1.5's UNet at 512x512 (random weights) timed alone on a GPU: forward (sampling) and forward+backward (training)
per row, fp32 weights under bf16 autocast (full fine-tuning), eager against channels-last and torch.compile.
python tools/gpu/unet_variants.py [rows]"""
import statistics, sys, time
import torch
from diffusers import UNet2DConditionModel
from ddpo_course.bench_gpu import SD15
rows = int(sys.argv[1]) if len(sys.argv) > 1 else 32
torch.manual_seed(0)
unet = UNet2DConditionModel(**{**SD15["unet"], "sample_size": 64}).cuda()
x, t, c = torch.randn(rows, 4, 64, 64, device="cuda"), torch.full((rows,), 500, device="cuda"), torch.randn(rows, 77, 768, device="cuda")
def timed(fn, n=5):
    for _ in range(2): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(n): s = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - s)
    return 1e3 * statistics.median(ts)
def run(m, label):
    def fwd():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16): m(x, t, c).sample
    def fwdbwd():
        with torch.autocast("cuda", torch.bfloat16): out = m(x, t, c).sample
        out.float().square().mean().backward()
    s0 = time.perf_counter(); f = timed(fwd); b = timed(fwdbwd, 3); unet.zero_grad(set_to_none=True)
    print(f"{label:<28} rows {rows}: forward {f:6.1f} ms ({f/rows:.2f}/row), forward+backward {b:6.1f} ms ({b/rows:.2f}/row)  [{time.perf_counter()-s0:.0f} s incl. warm-up]", flush=True)
run(unet, "eager")
unet.to(memory_format=torch.channels_last); x = x.to(memory_format=torch.channels_last)
run(unet, "channels_last")
unet.to(memory_format=torch.contiguous_format); x = x.contiguous()
run(torch.compile(unet), "torch.compile")
unet.to(memory_format=torch.channels_last); x = x.to(memory_format=torch.channels_last)
run(torch.compile(unet), "torch.compile+channels_last")
