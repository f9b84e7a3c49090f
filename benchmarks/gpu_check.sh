#!/usr/bin/env bash
# The GPU checks of one lent-GPU session, in one prepared run (benchmarks/README.md, "GPU"):
# the training engine's bf16 path on a 7B-shaped random base (bf16 and fp32 storage of the
# frozen base), then the peers' training steps and generation on the gpu-7b preset.
#
# The machine has torch, peft and transformers but not pydantic nor LitGPT: wheels carried in
# .whl/ (the project's pins of transformers, tokenizers, peft, pydantic) and .whl-litgpt/
# (LitGPT in its own path, as its huggingface-hub pin clashes with transformers 5) are
# installed first. Results land in $OUT (or /tmp/gpu-out).
# A dry run on a CPU machine with the project's venv: PRESET=tiny SKIP_WHEELS=1 PY=.venv/bin/python
set -u
out=${OUT:-/tmp/gpu-out} preset=${PRESET:-gpu-7b} py=${PY:-python3}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
pip_target() { $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$1" "${@:2}"; }
if [ -z "${SKIP_WHEELS:-}" ]; then
  pip_target /tmp/site .whl/*.whl || exit 1
  pip_target /tmp/litsite .whl-litgpt/*.whl || exit 1
fi
export LAV2_ROOT=$PWD PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
# LitGPT's child sees its own wheels and the repo only (not /tmp/site), as in the measured run.
printf '#!/bin/sh\nPYTHONPATH=/tmp/litsite:%s exec %s "$@"\n' "$PWD" "$py" >/tmp/litpy
chmod +x /tmp/litpy
$py -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'

for frozen in bfloat16 float32; do
  timeout 150 $py -m benchmarks.gpu_train_path --preset "$preset" --frozen-dtype "$frozen" \
    2>>"$out/stderr.log" | grep BENCH-RESULT | tee "$out/train_path_$frozen.json"
done

bench() {  # one runner call per group, so a late failure keeps the earlier group's results
  timeout "$1" $py -m benchmarks.runner --preset "$preset" --rounds 1 --warmup 2 --steps 5 \
    --no-mlflow --litgpt-python /tmp/litpy --timeout 110 --out "$out" --cases "$2" 2>&1 | tail -45
}
bench 260 matmul_ceiling,train_adapter_v2_language,train_litgpt_adapter_v2,train_peft_adaption_prompt,train_peft_lora,train_adapter_v2_visual,train_full_finetune
bench 120 generate_base,generate_adapter_v2_unfolded,generate_adapter_v2_folded
