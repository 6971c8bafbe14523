#!/usr/bin/env bash
# The main job: with the Neuron SDK, compile SD 1.5 for inf2; without it, export a bundled tiny example on CPU.
# Either way it then runs the rest of the loop: verify the export, look inside it, generate an image.
set -euo pipefail
cd "$(dirname "$0")/.."
# --force: a rerun after an upgrade replaces the demo's earlier export (--force replaces only our own exports).

if python3 -c "import torch_neuronx" >/dev/null 2>&1; then
    export_dir=exports/sd15-512
    neuron-export build configs/sd15-512.yaml -o "$export_dir" --force
    neuron-export verify "$export_dir" --instance inf2.xlarge
else
    echo "No Neuron SDK on this host: exporting the bundled tiny example pipeline with --backend cpu."
    export_dir=demo-output/tiny-sd-neuron
    python3 -m neuron_export.testing.examples sd demo-output/tiny-sd >/dev/null
    neuron-export sd --model demo-output/tiny-sd --backend cpu --output "$export_dir" --force
    neuron-export verify "$export_dir"
fi
neuron-export inspect "$export_dir"
neuron-export generate "$export_dir" --prompt "a lighthouse on a cliff at dusk" --steps 4 -o "$export_dir.png"
echo "Done: $export_dir (manifest.json inside) and $export_dir.png"
