#!/usr/bin/env bash
# The main job: compile the reference model 4-bit for the CPU (w4a8: int4 weights, int8 activations per block, the
# integer kernels; w4a16 keeps float activations), report perplexity, size and
# tokens/s, and generate a sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SHARED=${SHARED:-../shared}
MODEL=$SHARED/models/tinystories-llama
OUT=out/tinystories-w4
.venv/bin/llmpress compile "$MODEL" --pipeline w4a8 --target cpu -o "$OUT" --force  # a rerun replaces its own artifact
.venv/bin/llmpress eval "$OUT" --data "$SHARED/data/tinystories/valid.txt" --context 256
.venv/bin/llmpress run "$OUT" --prompt "once upon a time" --max-new-tokens 60
