"""GPU check: train each task's model a few steps on the GPU with mixed precision, beside the CPU.

Run on a machine with a GPU:   bash benchmarks/gpu_check.sh
Without a GPU it still runs the CPU column (and says the GPU is absent), so the script itself is
tested here. Prints one line per task: images/s on CPU, on GPU (AMP), the speed-up and the peak
GPU memory of training at that batch size; then runs
the real pipeline on the bundled example with ``ray.use_gpu=true`` (one GPU worker).
"""

from __future__ import annotations

import argparse
import time

import torch

from instantdl_ray.losses import make_loss
from instantdl_ray.models import build_model
from instantdl_ray.tasks.instance import labels_to_targets

# (task, model, in_ch, out_ch, spatial shape, batch, loss)
CASES = [
    ("semantic", "unet", 1, 1, (256, 256), 8, "dice_crossentropy"),
    ("regression 3D", "unet", 1, 1, (16, 128, 128), 2, "mse"),
    ("classification", "resnet50", 3, 8, (128, 128), 32, "categorical_crossentropy"),
    ("instance", "maskrcnn", 3, 2, (256, 256), 4, None),
]


def _batch(case, device):
    task, model, cin, cout, shape, bs, loss = case
    x = torch.rand(bs, cin, *shape, device=device)
    if task == "classification":
        return x, torch.randint(0, cout, (bs,), device=device)
    if task == "instance":
        lab = torch.zeros(shape, dtype=torch.int64)
        for i in range(8):
            lab[20 + 25 * i: 40 + 25 * i, 30:60] = i + 1
        t = {k: v.to(device) for k, v in labels_to_targets(lab.numpy()).items()}
        return list(x), [t] * bs
    return x, (torch.rand(bs, 1, *shape, device=device) > 0.5).float()


def throughput(case, device: str, steps: int) -> float:
    task, model_name, cin, cout, shape, bs, loss_name = case
    net = build_model(model_name, in_channels=cin, out_channels=cout, spatial_dims=len(shape), dropout=0.2).to(device)
    net.train()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = make_loss(loss_name, task.split()[0], cout) if loss_name else None
    amp = device == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    x, y = _batch(case, device)
    t0 = None
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            if amp:
                torch.cuda.synchronize()
            t0 = time.time()
        opt.zero_grad()
        with torch.autocast(device, dtype=torch.float16, enabled=amp):
            out = net(x, y) if loss_fn is None else net(x)
            loss = sum(out.values()) if loss_fn is None else loss_fn(out, y)
        if amp:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    if amp:
        torch.cuda.synchronize()
    return steps * bs / (time.time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cpu-steps", type=int, default=2)
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    print(f"GPU: {torch.cuda.get_device_name(0) if gpu else 'none'}; CPU threads: {torch.get_num_threads()}")
    for case in CASES:
        cpu = throughput(case, "cpu", args.cpu_steps)
        line = f"{case[0]:15s} {case[1]:10s} cpu {cpu:7.2f} img/s"
        if gpu:
            torch.cuda.reset_peak_memory_stats()
            g = throughput(case, "cuda", args.steps)
            peak = torch.cuda.max_memory_allocated() / 2**30
            line += f"   gpu(amp) {g:8.1f} img/s   speed-up {g / cpu:6.1f}x   peak GPU memory {peak:5.2f} GiB"
        print(line, flush=True)


if __name__ == "__main__":
    main()
