#!/usr/bin/env bash
# One-shot check of the CUDA speed paths, for a machine with a GPU (none was available when this
# was written). From the repository root:
#
#     bash benchmarks/cuda_check.sh [OUT_DIR]
#
# Writes to OUT_DIR (default: $OUT if set, else benchmarks/results/cuda-<time>):
#   env.txt      GPU, driver, torch and CUDA versions
#   tests.txt    tests/samplers/test_speed_paths.py and the sampler contract (tests/contracts,
#                tests/samplers/test_new_sampler.py) on this machine (their CUDA tests run only here:
#                every sampler follows the CUDA device, cuda_graph and compile+cuda_graph == eager,
#                Langevin noise from the generator, bf16 autocast, memory of a captured loop
#                independent of K)
#   fp32.md      benchmarks/run.py on cuda: eager vs compile vs cuda_graph vs compile+cuda_graph
#                against the plain loop, ODE, training steps, peak memory K=10 vs K=200
#   bf16.md      the same under bf16 autocast (training under precision="bf16-mixed")
#   gpu-*.md     benchmarks/gpu.py: CUDA paths == eager, steps/s and TFLOP/s against the bound,
#                the cifar10.yaml training step against its FLOP bound, DDP when 2 GPUs
#   *.log        the runs' own output
# Each part has its own time limit, so one slow part cannot eat the others' time; about 20 minutes
# in all on an H100-class GPU (most of it torch.compile).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/cuda-$(date +%Y%m%d-%H%M%S)}}
mkdir -p "$out"
py=${PYTHON:-python}

if ! $py -c "import lightning_ebm" 2>/dev/null; then
    $py -m pip install -q -e ".[dev]" || { echo "could not install lightning_ebm"; exit 1; }
fi
{
    nvidia-smi || true
    $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); \
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device"; exit 1; }

status=0
timeout 300 $py -m pytest tests/samplers/test_speed_paths.py tests/contracts/test_sampler_contract.py \
    tests/samplers/test_new_sampler.py -q -p no:cacheprovider > "$out/tests.txt" 2>&1 || status=1
tail -n 3 "$out/tests.txt"

# paper-size conv net (width 64), more steps per call than on the CPU
common=(--device cuda --conv-width 64 --mlp-steps 100 --conv-steps 40 --train-steps 10 --rounds 7)
timeout 360 $py benchmarks/run.py "${common[@]}" --out "$out/fp32.md" > "$out/fp32.log" 2>&1 || status=1
timeout 300 $py benchmarks/run.py "${common[@]}" --bf16 --only sampler,train,memory --out "$out/bf16.md" \
    > "$out/bf16.log" 2>&1 || status=1
# checks against eager, steps/s against the FLOP bound, the cifar10.yaml step, DDP on 2 GPUs
timeout 600 $py benchmarks/gpu.py --out "$out" > "$out/gpu.log" 2>&1 || status=1
for f in fp32 bf16; do [ -f "$out/$f.md" ] && cat "$out/$f.md"; done
cat "$out"/gpu-*.md 2>/dev/null
echo "results in $out (status $status)"
exit $status
