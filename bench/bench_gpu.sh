# GPU figures (run by hand on one CUDA GPU, about 10 minutes; results in docs/results): train.py's step on a random
# LLaVA-NeXT (bench.py's CLIP-L/336 + Qwen2-0.5B-sized checkpoint) under each fast-path flag, with tokens/s, MFU and
# peak GPU memory; the 7B-shaped stage-2 step (CLIP-L/336 + a Vicuna-7B-shaped decoder, FSDP2 bf16 mixed precision,
# 5 crops per image) with MFU and peak memory against the --plan figures; batch-1 bf16 decode, eager and compiled, of
# the 0.9B model; then bench/decode.py: a Mistral-7B-sized decoder at batch 1, 8 and 32, bf16 and int8.
#   bash bench/bench_gpu.sh            logs of each training run go to $OUT (default /tmp/bench_gpu)
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench_gpu}; mkdir -p $OUT
cd "$(dirname "$0")/.."  # the repository root
python3 - <<'PY'
import shutil
from pathlib import Path
from bench import bench
from toy import world as toy
f = bench.checkpoint(Path("/tmp/bench"), False)
toy.write_dataset(Path("/tmp/benchdata"), n_train=1200, n_eval=20, seed=0)
shutil.copy("/tmp/benchdata/tokenizer.json", f / "tokenizer.json")
PY
M=/tmp/bench/llava-next-clip-l-qwen2-0.5b
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
run() {  # name, steps, flags...
  name=$1; steps=$2; shift 2
  t0=$(date +%s); rm -rf /tmp/run_$name
  ${LAUNCH:-python3} train.py --model $M --data /tmp/benchdata/instruct.json --image-folder /tmp/benchdata --template qwen_1_5 \
    --max-steps 1000 --stop-after $steps --global-batch-size 32 --micro-batch-size 8 --save-every 100000 --quiet \
    --lr 1e-5 --vision-lr 2e-6 --output-dir /tmp/run_$name "$@" > $OUT/train_$name.log 2>&1 || echo "FAILED $name"
  echo "$name wall $(( $(date +%s) - t0 )) s"
  python3 - $name <<'PY'
import json, statistics, sys
name = sys.argv[1]
m = [json.loads(l) for l in open(f"/tmp/run_{name}/metrics.jsonl")]
if not m:
    sys.exit(f"{name}: no step finished (see its log)")
late = m[3:] or m
print(f"{name}: steps {len(m)}, loss {m[0]['loss']:.4f} -> {m[-1]['loss']:.4f}, tokens/s {statistics.median(x['tokens_per_s'] for x in late):.0f}, "
      f"mfu {statistics.median(x.get('mfu', 0) for x in late):.3f}, peak GPU memory {max(x['gpu_memory_gb'] for x in m):.1f} GB")
PY
}
run fp32 6
run bf16 10 --bf16
run bf16_compile 10 --bf16 --compile
run bf16_ckpt 10 --bf16 --gradient-checkpointing
run bf16_compile_ckpt 10 --bf16 --compile --gradient-checkpointing
run bf16_frozen_tower 10 --bf16 --freeze-vision-tower
# FSDP2 mixed precision (bf16 compute, fp32 master weights and AdamW) instead of autocast; one process under torchrun
LAUNCH="python3 -m torch.distributed.run --nproc_per_node 1" run bf16_fsdp 10 --bf16 --fsdp
LAUNCH="python3 -m torch.distributed.run --nproc_per_node 1" run bf16_fsdp_compile 10 --bf16 --fsdp --compile
python3 train.py --plan --model $M --template qwen_1_5 --micro-batch-size 8 --max-len 4096 --fsdp --bf16 --gpus 1 \
  --gpu-memory "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)MiB"
# the 7B-shaped stage-2 step: all 32 layers need ~125 GB with fp32 master weights and AdamW (an H200); 16 on 80 GB
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
layers=$([ "$mib" -gt 120000 ] && echo 32 || echo 16)
python3 bench/bench_train_step.py --preset 7b --device cuda --layers $layers --micro-batch-size 2 --gradient-checkpointing || echo "FAILED 7b"
python3 bench/bench_train_step.py --preset 7b --device cuda --layers 8 --micro-batch-size 2 || echo "FAILED 7b no checkpointing"
python3 bench/bench_train_step.py --preset 0.9b --device cuda --micro-batch-size 4 || echo "FAILED 0.9b step"
python3 bench/bench_train_step.py --preset 7b --device cuda --lora-rank 128 --micro-batch-size 4 --gradient-checkpointing || echo "FAILED 7b LoRA"
python3 - <<'PY'
import statistics, time, torch
import infer
from convert import load_pretrained
model, _ = load_pretrained("/tmp/bench/llava-next-clip-l-qwen2-0.5b", dtype=torch.bfloat16, device="cuda")
prompt = list(range(100, 132))
def rate(compile):
    stamps = []
    for _ in infer.generate(model, prompt, max_new_tokens=256, compile=compile):
        torch.cuda.synchronize(); stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])
for compile in (False, True):
    rates = [rate(compile) for _ in range(3)]
    print(f"decode bf16 batch 1, 256 tokens, compile={compile}: {[round(r) for r in rates]} tok/s")
weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith(("vision_tower", "projector", "language_model.embed")))
weights += model.output_embeddings().numel() * 2
print(f"decoder bytes read per token {weights/1e9:.2f} GB -> bound {3.35e12/weights:.0f} tok/s at 3.35 TB/s")
PY
# a Mistral-7B-sized decoder (LLaVA-1.6-Mistral's), random weights: decode tok/s at batch 1, 8 and 32, bf16 and int8
# (quantize.py), eager and compiled, each with its share of the bandwidth bound (bench/decode.py)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in *H200*) PEAK=4800;; *H100*PCIe*) PEAK=2000;; *H100*) PEAK=3350;; *A100*80GB*) PEAK=2039;; *A100*) PEAK=1555;; *) PEAK=;; esac
python3 bench/decode.py --device cuda --batches 1,8,32 --weights bf16,int8 --compile --new-tokens 128 ${PEAK:+--peak-gbps $PEAK}
