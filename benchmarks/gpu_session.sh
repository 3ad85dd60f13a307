#!/usr/bin/env bash
# One device call: GPU tests, a short bf16 training run through the CLI, the MoE-layer benchmark and a
# (reduced) model-throughput table beside the HF peer. Wheels missing on the GPU image travel in .whl/.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PARTS=${PARTS:-"tests train moe model"}   # which parts to run
has() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))"
has tests && echo "== GPU tests" && timeout 240 python3 -m pytest -q -p no:cacheprovider tests/moe/test_moe_cuda.py tests/ops/test_ops_cuda.py \
  tests/layers/test_linear_mixers_cuda.py tests/layers/test_part2_cuda.py tests/interop/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -8
if has train; then
echo "== CLI training on the GPU (bf16 autocast, fp32 master weights)"
timeout 240 python3 -m linear_moe train --quiet --train.max_steps 120 --train.batch_size 32 --train.seq_len 512 \
  --model.mixer gated_deltanet --model.layer_pattern LLLN --train.eval_interval 0 --train.log_interval 20 \
  --data.cache_dir /tmp/lmcache --train.output_dir /tmp/runs --train.run_name gpu 2>&1 | tail -4
tail -2 /tmp/runs/gpu/metrics.jsonl | cut -c1-400; cp /tmp/runs/gpu/metrics.jsonl "$OUT/gpu_train_metrics.jsonl"
fi
has moe && echo "== MoE layer" && timeout 120 python3 benchmarks/moe_bench.py
has model && echo "== model throughput" && timeout ${MODEL_BENCH_S:-240} python3 benchmarks/model_bench.py ${MODEL_BENCH_ARGS:---lengths 2048,8192,32768 --kinds gdn,hybrid,attention --peer peer_sdpa --steps 3 --warmup 1}
ls -la "$OUT"
