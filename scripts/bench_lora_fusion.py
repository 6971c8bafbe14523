"""Peak host memory of fusing a LoRA into full-size SD 1.5's UNet, the way an export's worker does it.

Builds (once) a random-weight SD 1.5 pipeline with the real architecture and a random rank-R LoRA for its UNet's
attention layers, then, in a fresh process: imports torch and diffusers, notes the resident memory, loads the
UNet from safetensors and fuses the LoRA with neuron-export's worker code (neuron_export.roles.lora.fuse).
The peak (the kernel's VmHWM) above that baseline is printed against the UNet's weight bytes, after fusing and
again after reading every weight once more (as tracing does next; safetensors maps the file, so fusing alone
pages in only the layers it changes). Target: the second figure at most 1.3x. Exits 1 when it is not.

    python scripts/bench_lora_fusion.py [--model-dir DIR] [--rank 64] [--keep]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET_RATIO = 1.3


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(model_dir: Path, lora_file: Path) -> None:
    """Runs in its own process: load the UNet alone, fuse, report memory as JSON on stdout."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401  (imported before the baseline: every export worker has it already)

    from neuron_export.build.worker import limit_fragmentation, release_memory
    from neuron_export.planning.lora import LoraFusion, key_prefixes
    from neuron_export.roles import lora, unet
    from neuron_export.roles.spec import ComponentSpec

    limit_fragmentation()
    release_memory()
    baseline = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    spec = ComponentSpec(name="unet", model_type="unet", task="semantic-segmentation", inputs=(), outputs=("sample",))
    model = unet.load(model_dir / "unet", spec)
    loaded = status_bytes("VmHWM")
    probe = next(m for name, m in model.named_modules() if name.endswith("attn1.to_q")).weight
    before = probe.detach().clone()
    fusion = LoraFusion(
        path=lora_file,
        sha256="",
        adapter_name="bench",
        scale=0.8,
        key_prefixes=key_prefixes("unet"),
        unet_config_mapping=False,
    )
    lora.fuse(model, "unet", (fusion,))
    changed = bool(
        (next(m for name, m in model.named_modules() if name.endswith("attn1.to_q")).weight - before).abs().max() > 0
    )
    fused = status_bytes("VmHWM")
    # Weights are mmapped: fusing pages in only the layers it changes. Reading every weight, as the trace does
    # next, pages in the rest: that peak shows whether a second copy of the UNet was made anywhere.
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    print(
        json.dumps(
            {
                "baseline": baseline,
                "after_load": loaded - baseline,
                "fusion": fused - baseline,
                "peak": status_bytes("VmHWM") - baseline,
                "fused": changed,
                "checksum": checksum,
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="an existing sd15-full example (built when absent)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--keep", action="store_true", help="keep the built model and LoRA")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0

    from sd15_full import build as build_sd15_full

    from neuron_export.testing.lora import build_lora

    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    model_dir = args.model_dir or work / "sd15-full"
    if not (model_dir / "unet" / "config.json").is_file():
        print(f"building full-size SD 1.5 (random weights) in {model_dir} ...", flush=True)
        build_sd15_full(model_dir)
    lora_file = build_lora(model_dir, work / "lora", components=("unet",), rank=args.rank)
    weights = sum(f.stat().st_size for f in (model_dir / "unet").glob("*.safetensors"))
    run = subprocess.run(
        [sys.executable, __file__, "--child", str(model_dir), str(lora_file)], capture_output=True, text=True
    )
    if run.returncode != 0:
        print(run.stderr[-3000:], file=sys.stderr)
        return 1
    result = json.loads(run.stdout.strip().splitlines()[-1])
    ratio = result["peak"] / weights
    print(f"UNet weights {weights / 2**30:.2f} GiB; LoRA rank {args.rank}: {lora_file.stat().st_size / 2**20:.0f} MiB")
    print(
        f"after loading the UNet: {result['after_load'] / 2**30:.2f} GiB above the baseline "
        f"({result['baseline'] / 2**30:.2f} GiB with torch and diffusers imported)"
    )
    print(
        f"peak while loading and fusing: {result['fusion'] / 2**30:.2f} GiB = {result['fusion'] / weights:.2f}x "
        f"the UNet's weights (mmapped: only the fused layers are paged in); weights changed: {result['fused']}"
    )
    print(
        f"peak once every weight is read too (as the trace does): {result['peak'] / 2**30:.2f} GiB = {ratio:.2f}x "
        f"the UNet's weights (target {TARGET_RATIO}x)"
    )
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if ratio <= TARGET_RATIO and result["fused"] else 1


if __name__ == "__main__":
    sys.exit(main())
