#!/usr/bin/env bash
# The main job: with the Neuron SDK, compile SD 1.5 for inf2; without it, export a bundled tiny example on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

if python3 -c "import torch_neuronx" >/dev/null 2>&1; then
    neuron-export build configs/sd15-512.yaml -o exports/sd15-512 --force
    exit 0
fi

echo "No Neuron SDK on this host: exporting the bundled tiny example pipeline with --backend cpu."
python3 -m neuron_export.examples sd demo-output/tiny-sd >/dev/null
neuron-export sd --model demo-output/tiny-sd --backend cpu --output demo-output/tiny-sd-neuron --force
echo "Done: demo-output/tiny-sd-neuron (see manifest.json there)."
