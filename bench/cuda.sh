#!/usr/bin/env bash
# The CUDA column of bench/run.py, on a GPU machine lent by this workplace's `device` tool. That machine has
# PyTorch with CUDA 13 but no MLX, reaches no package index, and takes at most 64 MiB of carried files a call,
# while the mlx[cuda13] wheels are ~90 MB: they travel in two parts, in two calls a few seconds apart (a lent
# machine goes back ~30 s after a call).
#
#   here:            bash bench/cuda.sh fetch     # wheels into .cuda-1/ and .cuda-2/ (git-ignored), ~55 + 35 MB
#   device, call 1:  carry [".cuda-1"], command: bash bench/cuda.sh stash
#   device, call 2:  carry [".cuda-2"], command: bash bench/cuda.sh run
#
# `run` installs MLX beside the machine's PyTorch (whose CUDA libraries MLX loads), times bench/run.py --gpu at both
# sizes in full fp32 and the dim-256 training figures again in TF32 (MLX's CUDA default), and checks `main.py --gpu`
# end to end on a small built-in corpus, within the device tool's 10 minutes a call. Logs and results_cuda*.json go
# to $OUT (the folder the device tool brings back), else to bench/. On your own CUDA machine instead:
# `pip install "mlx[cuda13]"`, then `python bench/run.py --gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
stash=/tmp/ragmlx-cuda
site=/tmp/ragmlx-cuda-site
out=${OUT:-bench}

case "${1:-}" in
fetch)
    version=$(python -c "import mlx.core as mx; print(mx.__version__)")  # the MLX the CPU figures used
    rm -rf .cuda-1 .cuda-2 .cuda-dl && mkdir -p .cuda-1 .cuda-2 .cuda-dl
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 -d .cuda-dl "mlx==$version" "mlx-cuda-13==$version"
    wheel=$(cd .cuda-dl && ls mlx_cuda_13-*.whl)
    split -n 2 -d ".cuda-dl/$wheel" ".cuda-1/$wheel.part-"
    mv ".cuda-1/$wheel.part-01" .cuda-2/
    mv .cuda-dl/mlx-*.whl .cuda-2/
    rm -rf .cuda-dl
    grep -qx '/.cuda-\*/' .git/info/exclude 2>/dev/null || echo '/.cuda-*/' >>.git/info/exclude
    du -sh .cuda-1 .cuda-2
    ;;
stash)
    mkdir -p "$stash" && cp .cuda-1/* "$stash"/
    nvidia-smi -L
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    ;;
run)
    [ -d "$stash" ] || { echo "bench/cuda.sh run: no $stash here: run 'stash' first, within ~30 s of this call" >&2; exit 2; }
    cp .cuda-2/* "$stash"/
    wheel=$(cd "$stash" && ls mlx_cuda_13-*.part-00 | sed 's/\.part-00$//')
    cat "$stash/$wheel".part-* >"$stash/$wheel" && rm "$stash/$wheel".part-*
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$stash"/*.whl
    # libmlx.so looks for CUDA's libraries in ../../nvidia/{cu13,cublas,cudnn,...}/lib beside itself: torch's.
    ln -sfn "$(python3 -c 'import nvidia, os; print(next(p for p in nvidia.__path__
        if any(os.path.isdir(os.path.join(p, d)) for d in ("cu13", "cublas", "cudnn"))))')" "$site/nvidia"
    export PYTHONPATH=$site PYTHONUNBUFFERED=1
    python3 -c "import mlx.core as mx; print('mlx', mx.__version__, 'cuda', mx.cuda.is_available(), mx.ones(4, stream=mx.gpu).sum().item())"
    nvidia-smi -L
    status=0
    timeout 300 python3 bench/run.py --gpu --skip_main --out "$out/results_cuda.json" 2>&1 | tee "$out/bench_cuda.log" \
        || status=1
    timeout 120 python3 main.py --gpu --target all --corpus_size 300 --retriever_iters 40 --num_iters 40 \
        --steps_per_eval 40 --save_dir /tmp/ragmlx-smoke 2>&1 | tee "$out/main_gpu.log" | tail -25 || status=1
    timeout 120 python3 bench/run.py --gpu --tf32 --only train --sizes small --out "$out/results_cuda_tf32.json" \
        2>&1 | tee "$out/bench_cuda_tf32.log" || status=1
    exit $status
    ;;
*)
    echo "usage: bash bench/cuda.sh fetch|stash|run" >&2
    exit 2
    ;;
esac
