#!/bin/bash
# Pack what benchmarks/gpu.py and benchmarks/train.py --device cuda need on a GPU machine that has
# torch, transformers and peft but no internet, no bitsandbytes and no weight packages:
#   bash benchmarks/gpu_bundle.sh            # writes .gpu/ (ignore it in git: echo /.gpu/ >> .git/info/exclude)
# then, on the GPU machine, from the repository root:
#   bash .gpu/run.sh                         # results under $OUT (default /tmp/out)
# The model is SmolLM2-135M's architecture with seeded random weights (the weights are 540 MB):
# every check compares two computations on the same weights, and timings do not depend on values.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu}
SITE=$(.venv/bin/python -c "import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))")
MODEL=$(.venv/bin/python -c "from graft import models; print(models.resolve('smollm2-135m'))")
rm -rf "$DEST" && mkdir -p "$DEST/site" "$DEST/smollm2"
cp -r "$SITE" "$DEST/site/"
# keep the CUDA 13 builds (the torch there is cu130) and the CPU one; the rest is ~150 MB
find "$DEST/site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
find "$DEST/site" -name __pycache__ -prune -exec rm -rf {} +
for f in config.json tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json; do
  [ -f "$MODEL/$f" ] && cp "$MODEL/$f" "$DEST/smollm2/"
done
head -700 ../shared/data/gsm8k/train.jsonl > "$DEST/gsm8k.jsonl"
cat > "$DEST/run.sh" <<'RUN'
#!/bin/bash
# one device call: environment, graft's GPU checks and timings, then the training benchmark on CUDA
cd "$(dirname "$0")/.."
B=$(basename "$(dirname "$0")")
export PYTHONPATH=$PWD/src:$PWD/$B/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.log"
python3 -c "import torch, transformers, peft, bitsandbytes, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, torch.cuda.is_available())" 2>&1 | tail -3 | tee -a "$OUT/env.log"
python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from gpu import random_model_dir
random_model_dir(Path('$B/smollm2'), Path('/tmp/smol'))" 2>&1 | tail -2
echo "setup done at $(( $(date +%s) - T0 )) s"
timeout "${GPU_S:-270}" python3 benchmarks/gpu.py --model /tmp/smol --data "$B/gsm8k.jsonl" --json "$OUT/gpu.json" ${GPU_ARGS:-} 2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/gpu.log"
echo "gpu.py done at $(( $(date +%s) - T0 )) s"
timeout "${TRAIN_S:-200}" python3 benchmarks/train.py --device cuda --model /tmp/smol --data "$B/gsm8k.jsonl" --examples "${EXAMPLES:-512}" ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log"
echo "all done at $(( $(date +%s) - T0 )) s"
RUN
chmod +x "$DEST/run.sh"
du -sh "$DEST"
