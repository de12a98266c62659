#!/usr/bin/env bash
# The demo: train a LoRA end to end on a tiny FLUX.2-klein-shaped model with real photos, on CPU,
# offline, in a few minutes; then generate an image with it.
#   bash scripts/demo.sh            (outputs in demo_out/)
set -euo pipefail
export HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."

fluxtune make-tiny flux2-klein demo_out/tiny-klein
python -m data_tools.demo_photos demo_out/photos
fluxtune train configs/tiny-demo.yaml
fluxtune generate --model demo_out/tiny-klein --lora demo_out/run/lora --steps 8 --width 256 --height 256 \
    --prompt "a photo of a cat, in the style of sks" --out demo_out/sample.png
echo "demo finished: LoRA in demo_out/run/lora, sample image demo_out/sample.png"
