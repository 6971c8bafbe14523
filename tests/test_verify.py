"""`neuron-export verify`: integrity (exit 3), compatibility (exit 4), fit (exit 5), and the estimator's verdicts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import export_tiny as export, run_cli

from neuron_export import verify
from neuron_export.targets import BY_NAME, GIB, INSTANCES
from neuron_export.verify import ComponentFootprint, RuntimeEnv, estimate, fits, smallest_fit

REAL_PROBE = verify.probe_environment
NO_SDK = RuntimeEnv(torch="2.13.0+cpu", diffusers="0.42.1", sdk_problem="ModuleNotFoundError: No module named 'torch_neuronx'",
                    diffusers_pipelines=frozenset({"StableDiffusionPipeline", "StableDiffusionXLPipeline"}))
WITH_SDK = RuntimeEnv(torch="2.8.0", diffusers="0.35.2", torch_neuronx="2.8.0.2.10.0", neuronx_cc="2.21.18209.0",
                      sdk_problem=None, diffusers_pipelines=frozenset({"StableDiffusionPipeline", "StableDiffusionXLPipeline"}))


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `neuron-export ARGS`, as the tests below read it."""
    result = run_cli(*args)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def sd_export(tiny_model, tmp_path_factory) -> Path:
    return export(tiny_model("sd"), tmp_path_factory.mktemp("verify") / "sd", "sd")


@pytest.fixture(scope="module")
def sdxl_export(tiny_model, tmp_path_factory) -> Path:
    return export(tiny_model("sdxl"), tmp_path_factory.mktemp("verify") / "sdxl", "sd-xl")


@pytest.fixture
def copy(tmp_path):
    def make(source: Path) -> Path:
        return Path(shutil.copytree(source, tmp_path / source.name))
    return make


@pytest.fixture(autouse=True)
def host_without_sdk(monkeypatch):
    """Every CLI run sees the same host: no Neuron SDK, this torch and diffusers."""
    monkeypatch.setattr(verify, "probe_environment", lambda: NO_SDK)


def rewrite_manifest(directory: Path, change) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


# ------------------------------------------------------------------------------------------ integrity

def test_clean_export_passes_with_exit_0_and_one_json_object(sd_export, capsys):
    code, out, err = cli(capsys, "verify", sd_export, "--json")
    assert code == 0, err
    report = json.loads(out)  # exactly one object, nothing else on stdout
    assert report["ok"] is True and report["exit_code"] == 0
    assert {name: c["verdict"] for name, c in report["checks"].items()} == {
        "integrity": "ok", "compatibility": "ok", "fit": "skipped"}
    assert report["checks"]["integrity"]["details"]["listed_files"] >= 15


def test_one_flipped_byte_fails_integrity_and_names_the_file(sd_export, copy, capsys):
    broken = copy(sd_export)
    artifact = broken / "unet" / "model.neuron"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit of one byte
    artifact.write_bytes(bytes(data))

    code, out, err = cli(capsys, "verify", broken)
    assert code == verify.INTEGRITY_EXIT == 3
    assert "unet/model.neuron" in out and "sha256" in out
    assert "text_encoder/model.neuron" not in out.split("exit code")[0].split("integrity")[1].split("compatibility")[0]

    code, out, _ = cli(capsys, "verify", broken, "--json")
    report = json.loads(out)
    assert code == 3 and report["exit_code"] == 3 and report["ok"] is False
    problems = report["checks"]["integrity"]["problems"]
    assert len(problems) == 1 and problems[0].startswith("unet/model.neuron: sha256")


def test_missing_and_truncated_files_fail_integrity(sd_export, copy, capsys):
    broken = copy(sd_export)
    (broken / "vae_decoder" / "config.json").unlink()
    (broken / "tokenizer" / "vocab.json").write_text("{}")
    code, out, _ = cli(capsys, "verify", broken, "--json")
    assert code == 3
    problems = json.loads(out)["checks"]["integrity"]["problems"]
    assert "vae_decoder/config.json: missing" in problems
    assert any(p.startswith("tokenizer/vocab.json: 2 bytes, the manifest records") for p in problems)


@pytest.mark.parametrize("stray", ["unet/model-old.neuron", "vae/config.json", "text_encoder_2/config.json",
                                   "tokenizer/added_tokens.json", "controlnet_0/model.neuron"])
def test_stray_files_the_loader_would_pick_up_fail_integrity(sd_export, copy, capsys, stray):
    broken = copy(sd_export)
    (broken / stray).parent.mkdir(parents=True, exist_ok=True)
    (broken / stray).write_text("{}")
    code, out, _ = cli(capsys, "verify", broken, "--json")
    assert code == 3
    problems = json.loads(out)["checks"]["integrity"]["problems"]
    assert len(problems) == 1 and problems[0].startswith(f"{stray}: not in the manifest, and ")


def test_harmless_extras_are_noted_and_hub_files_ignored(sd_export, copy, capsys):
    extra = copy(sd_export)
    (extra / "README.md").write_text("# card\n")
    (extra / ".gitattributes").write_text("*.neuron filter=lfs\n")
    (extra / "notes.txt").write_text("benchmarks\n")
    (extra / ".cache" / "huggingface" / "download").mkdir(parents=True)  # what `hf download --local-dir` leaves
    (extra / ".cache" / "huggingface" / "download" / "unet.metadata").write_text("abc\n")
    code, out, _ = cli(capsys, "verify", extra, "--json")
    assert code == 0
    integrity = json.loads(out)["checks"]["integrity"]
    assert integrity["verdict"] == "ok"
    assert [n.split(":")[0] for n in integrity["notes"]] == ["notes.txt"]


def test_no_manifest_or_a_broken_one_is_a_user_error(sd_export, copy, tmp_path, capsys):
    code, _, err = cli(capsys, "verify", tmp_path)
    assert code == 2 and "has no manifest.json" in err and "Traceback" not in err
    broken = copy(sd_export)
    (broken / "manifest.json").write_text((broken / "manifest.json").read_text()[:200])
    code, _, err = cli(capsys, "verify", broken)
    assert code == 2 and "not a valid neuron-export manifest" in err and len(err.strip().splitlines()) == 1


def test_unknown_target_is_a_user_error(sd_export, capsys):
    code, _, err = cli(capsys, "verify", sd_export, "--target", "inf1.xlarge")
    assert code == 2 and "--target inf1.xlarge" in err and "inf2.xlarge" in err


def test_integrity_decides_the_exit_code_before_compatibility(sd_export, copy, capsys):
    broken = copy(sd_export)
    (broken / "unet" / "config.json").unlink()
    code, out, _ = cli(capsys, "verify", broken, "--target", "inf2.xlarge", "--json")
    checks = json.loads(out)["checks"]
    assert checks["integrity"]["verdict"] == "failed" and checks["compatibility"]["verdict"] == "failed"
    assert code == 3


# ------------------------------------------------------------------------------------------ compatibility

def as_neuron_export(data: dict, compiler: str = "2.21.18209.0", torch_neuronx: str | None = "2.8.0.2.10.0") -> None:
    for record in data["components"].values():
        record.update(backend="neuron", compiler_type="neuronx-cc", compiler_version=compiler,
                      compiler_args=record["neuron_compiler_args"])
    data["environment"].update(torch="2.8.0", torch_neuronx=torch_neuronx, neuronx_cc=compiler)


def test_cpu_export_cannot_run_on_a_neuroncore(sd_export, capsys):
    code, out, _ = cli(capsys, "verify", sd_export, "--target", "inf2.xlarge", "--json")
    assert code == verify.COMPATIBILITY_EXIT == 4
    compat = json.loads(out)["checks"]["compatibility"]
    assert compat["verdict"] == "failed"
    assert compat["problems"][0].startswith("cpu-artifact-on-neuroncore: text_encoder, unet, vae_encoder, vae_decoder")


def test_neuron_export_on_a_host_without_the_sdk_is_unchecked_not_passed(sd_export, copy, capsys):
    neuron = copy(sd_export)
    rewrite_manifest(neuron, as_neuron_export)
    code, out, _ = cli(capsys, "verify", neuron, "--json")
    compat = json.loads(out)["checks"]["compatibility"]
    assert code == 0 and compat["verdict"] == "unchecked"
    assert "cannot be checked here" in compat["summary"]
    code, out, _ = cli(capsys, "verify", neuron)
    assert "UNCHECKED" in out
    code, _, _ = cli(capsys, "verify", neuron, "--strict")
    assert code == 4


def test_rules_on_a_neuron_host(sd_export):
    from neuron_export.manifest import Manifest

    data = json.loads((sd_export / "manifest.json").read_text())
    as_neuron_export(data)
    manifest = Manifest.model_validate(data)
    assert verify.check_compatibility(manifest, WITH_SDK).verdict == "ok"

    other_cc = RuntimeEnv(**{**WITH_SDK.__dict__, "neuronx_cc": "2.22.1.0"})
    result = verify.check_compatibility(manifest, other_cc)
    assert result.verdict == "failed" and result.problems[0].startswith("neuronx-cc-release: text_encoder (neuronx-cc 2.21")

    other_tnx = RuntimeEnv(**{**WITH_SDK.__dict__, "torch_neuronx": "2.9.0.2.11.0"})
    assert [p.split(":")[0] for p in verify.check_compatibility(manifest, other_tnx).problems] == ["torch-neuronx-release"]

    old_torch = RuntimeEnv(**{**WITH_SDK.__dict__, "torch": "2.7.1"})
    problems = verify.check_compatibility(manifest, old_torch).problems
    assert [p.split(":")[0] for p in problems] == ["torchscript-newer-torch"] and "torch 2.8.0, newer than" in problems[0]

    old_diffusers = RuntimeEnv(**{**WITH_SDK.__dict__, "diffusers": "0.29.0"})
    assert [p.split(":")[0] for p in verify.check_compatibility(manifest, old_diffusers).problems] == ["diffusers-pipeline-class"]
    no_class = RuntimeEnv(**{**WITH_SDK.__dict__, "diffusers_pipelines": frozenset({"StableDiffusionXLPipeline"})})
    assert "has no StableDiffusionPipeline" in verify.check_compatibility(manifest, no_class).problems[0]


def test_every_rule_has_a_one_line_reason():
    assert len({rule.id for rule in verify.RULES}) == len(verify.RULES) >= 5
    assert all(rule.reason and "\n" not in rule.reason for rule in verify.RULES)


def test_probe_environment_here_reports_the_missing_sdk():
    real = REAL_PROBE()  # the autouse fixture replaced verify.probe_environment for CLI runs
    assert real.torch and real.diffusers and not real.has_sdk and real.sdk_problem
    assert {"StableDiffusionPipeline", "StableDiffusionXLPipeline", "LatentConsistencyModelPipeline"} <= real.diffusers_pipelines


# ------------------------------------------------------------------------------------------ fit

SD15 = {"text_encoder": 123_060_480, "unet": 859_520_964, "vae_encoder": 34_163_592, "vae_decoder": 49_490_199}
SDXL = {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "unet": 2_567_463_684,
        "vae_encoder": 34_163_592, "vae_decoder": 49_490_199}


def full_size(params: dict[str, int], side: int, artifact_bytes: int = 0) -> list[ComponentFootprint]:
    """Real models' parameter counts at real shapes (artifact sizes 0: the estimate then uses 4 bytes/param)."""
    latent = side // 8
    shapes = {"text_encoder": ((1, 77),), "text_encoder_2": ((1, 77),), "unet": ((1, 4, latent, latent), (1,)),
              "vae_encoder": ((1, 3, side, side),), "vae_decoder": ((1, 4, latent, latent),)}
    return [ComponentFootprint(name, count, artifact_bytes, shapes[name]) for name, count in params.items()]


CASES = {
    "sd15-512": (SD15, 512, "unet"),
    "sdxl-1024": (SDXL, 1024, "unet"),
    "sdxl-turbo-512": (SDXL, 512, "unet"),  # what our plan records for turbo (not LCM)
    "sdxl-turbo-512-all": (SDXL, 512, "all"),  # how the field notes say turbo-style pipelines are loaded
}
EXPECTED = {  # (fits inf2.xlarge, fits inf2.8xlarge)
    "sd15-512": (True, True),
    "sdxl-1024": (False, True),
    "sdxl-turbo-512": (False, True),
    "sdxl-turbo-512-all": (False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fit_verdicts_on_inf2_xlarge_and_8xlarge(case):
    params, side, mode = CASES[case]
    footprint = estimate(full_size(params, side), mode)
    got = (fits(footprint, BY_NAME["inf2.xlarge"]).fits, fits(footprint, BY_NAME["inf2.8xlarge"]).fits)
    assert got == EXPECTED[case]
    if not got[0]:
        reasons = fits(footprint, BY_NAME["inf2.xlarge"]).reasons
        assert len(reasons) == 1 and reasons[0].startswith("host RAM:") and "inf2.xlarge has 16 GiB" in reasons[0]
        assert smallest_fit(footprint, "inf2").name == "inf2.8xlarge"
    else:
        assert smallest_fit(footprint, "inf2").name == "inf2.xlarge"


def test_fit_arithmetic_is_the_documented_formula():
    sdxl = estimate(full_size(SDXL, 1024), "unet", "matmul", "bf16")
    by_name = {c.name: c for c in sdxl.components}
    unet = by_name["unet"]
    assert unet.copies == 2 and unet.host_bytes_per_copy == SDXL["unet"] * 4 and unet.device_weight_bytes == SDXL["unet"] * 2
    assert by_name["vae_decoder"].activation_bytes == 4 * (1 * 128 * 1024 * 1024 * 4)  # 2 GiB at 1024x1024
    assert by_name["text_encoder"].activation_bytes == verify.ACTIVATION_FLOOR_BYTES
    host = verify.HOST_BASE_BYTES + 4 * (sum(SDXL.values()) + SDXL["unet"])
    assert sdxl.host_bytes == host and 25 * GIB < host < 26 * GIB  # well over inf2.xlarge's 16 GiB
    core0 = verify.CORE_RESERVE_BYTES + sum(c.device_bytes for c in sdxl.components)
    assert sdxl.core_bytes == (core0, verify.CORE_RESERVE_BYTES + unet.device_bytes)
    assert core0 < 16 * GIB  # device memory is not what stops SDXL on inf2.xlarge
    fp32 = estimate(full_size(SDXL, 1024), "unet", "none", None)
    assert {c.name: c.device_weight_bytes for c in fp32.components}["unet"] == SDXL["unet"] * 4
    assert estimate(full_size(SDXL, 1024), "all").core_bytes[0] == estimate(full_size(SDXL, 1024), "all").core_bytes[1]


def test_artifact_bytes_count_when_larger_than_the_weights():
    small = estimate(full_size(SD15, 512), "unet").host_bytes
    padded = estimate(full_size(SD15, 512, artifact_bytes=5 * GIB), "unet").host_bytes
    assert padded == verify.HOST_BASE_BYTES + 5 * GIB * 5  # 4 components, the UNet twice
    assert padded > small


def test_instance_table_rows():
    rows = {i.name: (i.chips, i.neuron_cores, i.device_memory_gib, i.vcpus, i.host_memory_gib) for i in INSTANCES}
    assert rows["inf2.xlarge"] == (1, 2, 32, 4, 16)
    assert rows["inf2.8xlarge"] == (1, 2, 32, 32, 128)
    assert rows["inf2.24xlarge"] == (6, 12, 192, 96, 384)
    assert rows["inf2.48xlarge"] == (12, 24, 384, 192, 768)
    assert rows["trn1.2xlarge"] == (1, 2, 32, 8, 32)
    assert rows["trn1.32xlarge"] == (16, 32, 512, 128, 512)
    assert all(i.source for i in INSTANCES) and BY_NAME["inf2.xlarge"].device_memory_per_core_bytes == 16 * GIB


def real_counts(params: dict[str, int], side: int, mode: str):
    """Turn a tiny export's manifest into a full-size one: real parameter counts and shapes, a Neuron build."""
    def change(data: dict) -> None:
        as_neuron_export(data)
        latent = side // 8
        data["pipeline"].update(height=side, width=side, data_parallel_mode=mode)
        for name, record in data["components"].items():
            record["parameter_count"] = params[name]
            for tensor in record["inputs"]:
                if tensor["name"] in ("sample", "latent_sample") and len(tensor["shape"]) == 4:
                    h = side if name == "vae_encoder" else latent
                    tensor["shape"] = [tensor["shape"][0], tensor["shape"][1], h, h]
    return change


@pytest.mark.parametrize("case,target,code", [
    ("sd15-512", "inf2.xlarge", 0), ("sd15-512", "inf2.8xlarge", 0),
    ("sdxl-1024", "inf2.xlarge", 5), ("sdxl-1024", "inf2.8xlarge", 0),
    ("sdxl-turbo-512", "inf2.xlarge", 5), ("sdxl-turbo-512", "inf2.8xlarge", 0),
])
def test_fit_through_the_cli_with_full_size_manifests(sd_export, sdxl_export, copy, capsys, case, target, code):
    params, side, mode = CASES[case]
    directory = copy(sd_export if params is SD15 else sdxl_export)
    rewrite_manifest(directory, real_counts(params, side, mode))
    got, out, _ = cli(capsys, "verify", directory, "--target", target, "--json")
    report = json.loads(out)
    assert got == code, report["checks"]["fit"]
    assert report["checks"]["integrity"]["verdict"] == "ok"  # parameter counts are not hashed files
    fit = report["checks"]["fit"]
    if code == verify.FIT_EXIT:
        assert fit["verdict"] == "failed"
        assert "host RAM" in fit["summary"] and "inf2.xlarge has 16 GiB" in fit["summary"]
        assert fit["details"]["smallest_fit"] == "inf2.8xlarge" and "smallest instance that fits: inf2.8xlarge" in fit["summary"]
        got, out, _ = cli(capsys, "verify", directory, "--target", target)
        assert got == 5 and "does not fit inf2.xlarge" in out and "inf2.8xlarge" in out
    else:
        assert fit["verdict"] == "ok"
