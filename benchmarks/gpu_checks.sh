#!/usr/bin/env bash
# The GPU checks of the issues, in one call on a lent machine (torch preinstalled there):
# optimizer step vs SGD/AdamW with the sync-free and CUDA-graph checks, SOFIM on CUDA against
# a float64 CPU run, one ResNet-18 epoch of train_trial with bf16 and channels_last, and
# the study throughput of batched trials.
# Usage: OUT=/some/dir bash benchmarks/gpu_checks.sh
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
python3 - <<'PY' 2>&1 | tee "$OUT/cuda_vs_float64.txt"
import torch
from sofim_tune import SOFIM
torch.manual_seed(0)
shapes = [(64, 3, 3, 3), (64,), (512, 256), (10,)]
cpu = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
gpu = [torch.nn.Parameter(p.detach().float().cuda()) for p in cpu]
opt_cpu, opt_gpu = SOFIM(cpu, lr=0.1, rho=0.5), SOFIM(gpu, lr=0.1, rho=0.5)
for step in range(50):
    for a, b in zip(cpu, gpu):
        g = torch.sin(a.detach() * (step + 1)) + 0.1 * a.detach()
        a.grad, b.grad = g, g.float().cuda()
    opt_cpu.step(); opt_gpu.step()
err = max(((a.detach() - b.detach().double().cpu()).norm() / a.detach().norm()).item() for a, b in zip(cpu, gpu))
print(f"SOFIM float32 on CUDA vs float64 on CPU after 50 steps: max relative error {err:.2e}")
PY
python3 benchmarks/optimizer_step.py --device cuda --repeats 30 2>&1 | tee "$OUT/optimizer_step_cuda.txt"
python3 benchmarks/trial_throughput.py --gpu-epoch --batch-size 512 2>&1 | tee "$OUT/gpu_epoch.txt"
# Trials per minute of whole studies on one GPU: batched against one at a time (target >= 8x).
python3 benchmarks/study_throughput.py --device cuda --cnn-trials 48 2>&1 | tee "$OUT/study_throughput_cuda.txt"
# The same through the Ray backend: a quarter GPU per trial against a quarter GPU per batch server.
python3 benchmarks/study_throughput.py --ray --device cuda --ray-batch 8 16 --digits-trials 96 2>&1 | tee "$OUT/study_throughput_ray_cuda.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/digits_cuda.txt"
from sofim_tune.trial import TrialConfig, train_trial
r = train_trial(TrialConfig(dataset="digits", device="cuda", hyperparameters={"lr": 0.1, "rho": 0.1, "beta1": 0.9}, epochs=10))
print("digits on cuda:", r.status, round(r.metrics["val_accuracy"], 4), f"{r.seconds:.2f} s")
PY
