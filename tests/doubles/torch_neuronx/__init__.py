"""TEST DOUBLE of AWS's `torch_neuronx` module (the real SDK is not installable here).

`trace()` records each call as a JSON line in `torch_neuronx_calls.jsonl` two levels above the compiler
work dir (the test's tmp directory, since exports run in worker processes), then traces on the CPU so
the export completes. If a file `torch_neuronx_fail_on` there names the component, it fails like a
neuronx-cc crash instead.
"""

import json
import os
from pathlib import Path

import torch

__version__ = "0.0.0+test-double"
ENVIRONMENT_KEYS = ("NEURON_FUSE_SOFTMAX", "NEURON_CUSTOM_SILU")


def trace(func, example_inputs, *, compiler_args=None, inline_weights_to_neff=True, compiler_workdir=None):
    workdir = Path(compiler_workdir)
    test_dir = workdir.parent.parent
    component = workdir.name
    call = {
        "component": component,
        "compiler_args": list(compiler_args),
        "inline_weights_to_neff": inline_weights_to_neff,
        "compiler_workdir": str(workdir),
        "workdir_existed": workdir.is_dir(),
        "input_shapes": [list(t.shape) for t in example_inputs],
        "environment": {key: os.environ.get(key) for key in ENVIRONMENT_KEYS},
    }
    with (test_dir / "torch_neuronx_calls.jsonl").open("a") as log:
        log.write(json.dumps(call) + "\n")
    fail_on = test_dir / "torch_neuronx_fail_on"
    if fail_on.exists() and fail_on.read_text().strip() == component:
        (workdir / "log-neuron-cc.txt").write_text("ERROR: out of memory\n")
        raise RuntimeError("neuronx-cc failed with exit code -9")
    return torch.jit.trace(func, tuple(example_inputs), strict=False, check_trace=False)
