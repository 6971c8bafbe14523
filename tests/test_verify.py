"""`neuron-export verify`: integrity (exit 3), compatibility (exit 4), fit (exit 5), and the estimator's verdicts."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import export_tiny as export

from neuron_export.deploy import compatibility, footprint, verify
from neuron_export.deploy.compatibility import RuntimeEnv
from neuron_export.deploy.footprint import ComponentFootprint, estimate, fits, smallest_fit, together
from neuron_export.deploy.instances import BY_NAME, GIB, INSTANCES
from neuron_export.errors import ExitCode

REAL_PROBE = verify.probe_environment
NO_SDK = RuntimeEnv(
    torch="2.13.0+cpu",
    diffusers="0.42.1",
    sdk_problem="ModuleNotFoundError: No module named 'torch_neuronx'",
    diffusers_pipelines=frozenset({"StableDiffusionPipeline", "StableDiffusionXLPipeline"}),
)
WITH_SDK = RuntimeEnv(
    torch="2.8.0",
    diffusers="0.35.2",
    torch_neuronx="2.8.0.2.10.0",
    neuronx_cc="2.21.18209.0",
    sdk_problem=None,
    diffusers_pipelines=frozenset({"StableDiffusionPipeline", "StableDiffusionXLPipeline"}),
)


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


def test_clean_export_passes_with_exit_0_and_one_json_object(sd_export, cli):
    code, out, err = cli("verify", sd_export, "--json")
    assert code == 0, err
    report = json.loads(out)  # exactly one object, nothing else on stdout
    assert report["ok"] is True and report["exit_code"] == 0
    assert {name: c["verdict"] for name, c in report["checks"].items()} == {
        "integrity": "ok",
        "compatibility": "ok",
        "fit": "skipped",
    }
    on_disk = sum(1 for f in sd_export.rglob("*") if f.is_file() and f.name != "manifest.json")
    assert report["checks"]["integrity"]["details"]["listed_files"] == on_disk >= 14


def test_one_flipped_byte_fails_integrity_and_names_the_file(sd_export, copy, cli):
    broken = copy(sd_export)
    artifact = broken / "unet" / "model.neuron"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit of one byte
    artifact.write_bytes(bytes(data))

    code, out, err = cli("verify", broken)
    assert code == ExitCode.INTEGRITY == 3
    assert "unet/model.neuron" in out and "sha256" in out
    assert "text_encoder/model.neuron" not in out.split("exit code")[0].split("integrity")[1].split("compatibility")[0]

    code, out, _ = cli("verify", broken, "--json")
    report = json.loads(out)
    assert code == 3 and report["exit_code"] == 3 and report["ok"] is False
    problems = report["checks"]["integrity"]["problems"]
    assert len(problems) == 1 and problems[0].startswith("unet/model.neuron: sha256")


def test_missing_and_truncated_files_fail_integrity(sd_export, copy, cli):
    broken = copy(sd_export)
    (broken / "vae_decoder" / "config.json").unlink()
    (broken / "tokenizer" / "vocab.json").write_text("{}")
    code, out, _ = cli("verify", broken, "--json")
    assert code == 3
    problems = json.loads(out)["checks"]["integrity"]["problems"]
    assert "vae_decoder/config.json: missing" in problems
    assert any(p.startswith("tokenizer/vocab.json: 2 bytes, the manifest records") for p in problems)


@pytest.mark.parametrize(
    "stray",
    [
        "unet/model-old.neuron",
        "vae/config.json",
        "text_encoder_2/config.json",
        "tokenizer/added_tokens.json",
        "controlnet_0/model.neuron",
    ],
)
def test_stray_files_the_loader_would_pick_up_fail_integrity(sd_export, copy, cli, stray):
    broken = copy(sd_export)
    (broken / stray).parent.mkdir(parents=True, exist_ok=True)
    (broken / stray).write_text("{}")
    code, out, _ = cli("verify", broken, "--json")
    assert code == 3
    problems = json.loads(out)["checks"]["integrity"]["problems"]
    assert len(problems) == 1 and problems[0].startswith(f"{stray}: not in the manifest, and ")


def test_harmless_extras_are_noted_and_hub_files_ignored(sd_export, copy, cli):
    extra = copy(sd_export)
    (extra / "README.md").write_text("# card\n")
    (extra / ".gitattributes").write_text("*.neuron filter=lfs\n")
    (extra / "notes.txt").write_text("benchmarks\n")
    (extra / ".cache" / "huggingface" / "download").mkdir(parents=True)  # what `hf download --local-dir` leaves
    (extra / ".cache" / "huggingface" / "download" / "unet.metadata").write_text("abc\n")
    code, out, _ = cli("verify", extra, "--json")
    assert code == 0
    integrity = json.loads(out)["checks"]["integrity"]
    assert integrity["verdict"] == "ok"
    assert [n.split(":")[0] for n in integrity["notes"]] == ["notes.txt"]


def test_no_manifest_or_a_broken_one_is_a_user_error(sd_export, copy, tmp_path, cli):
    code, _, err = cli("verify", tmp_path)
    assert code == 2 and "has no manifest.json" in err and "Traceback" not in err
    broken = copy(sd_export)
    (broken / "manifest.json").write_text((broken / "manifest.json").read_text()[:200])
    code, _, err = cli("verify", broken)
    assert code == 2 and "not a valid neuron-export manifest" in err and len(err.strip().splitlines()) == 1


def test_unknown_target_is_a_user_error(sd_export, cli):
    code, _, err = cli("verify", sd_export, "--instance", "inf1.xlarge")
    assert code == 2 and "--instance inf1.xlarge" in err and "inf2.xlarge" in err


def test_integrity_decides_the_exit_code_before_compatibility(sd_export, copy, cli):
    broken = copy(sd_export)
    (broken / "unet" / "config.json").unlink()
    code, out, _ = cli("verify", broken, "--instance", "inf2.xlarge", "--json")
    checks = json.loads(out)["checks"]
    assert checks["integrity"]["verdict"] == "failed" and checks["compatibility"]["verdict"] == "failed"
    assert code == 3


# ------------------------------------------------------------------------------------------ compatibility


def as_neuron_export(data: dict, compiler: str = "2.21.18209.0", torch_neuronx: str | None = "2.8.0.2.10.0") -> None:
    for record in data["components"].values():
        record.update(
            backend="neuron",
            compiler_type="neuronx-cc",
            compiler_version=compiler,
            compiler_args=record["neuron_compiler_args"],
        )
    data["environment"].update(torch="2.8.0", torch_neuronx=torch_neuronx, neuronx_cc=compiler)


def test_cpu_export_cannot_run_on_a_neuroncore(sd_export, cli):
    code, out, _ = cli("verify", sd_export, "--instance", "inf2.xlarge", "--json")
    assert code == ExitCode.COMPATIBILITY == 4
    compat = json.loads(out)["checks"]["compatibility"]
    assert compat["verdict"] == "failed"
    assert compat["problems"][0].startswith("cpu-artifact-on-neuroncore: text_encoder, unet, vae_encoder, vae_decoder")


def test_neuron_export_on_a_host_without_the_sdk_is_unchecked_not_passed(sd_export, copy, cli):
    neuron = copy(sd_export)
    rewrite_manifest(neuron, as_neuron_export)
    code, out, _ = cli("verify", neuron, "--json")
    compat = json.loads(out)["checks"]["compatibility"]
    assert code == 0 and compat["verdict"] == "unchecked"
    assert "cannot be checked here" in compat["summary"]
    code, out, _ = cli("verify", neuron)
    assert "UNCHECKED" in out
    code, _, _ = cli("verify", neuron, "--strict")
    assert code == 4


def test_rules_on_a_neuron_host(sd_export):
    from neuron_export.manifest import Manifest

    data = json.loads((sd_export / "manifest.json").read_text())
    as_neuron_export(data)
    manifest = Manifest.model_validate(data)
    assert compatibility.check_compatibility(manifest, WITH_SDK).verdict == "ok"

    other_cc = RuntimeEnv(**{**WITH_SDK.__dict__, "neuronx_cc": "2.22.1.0"})
    result = compatibility.check_compatibility(manifest, other_cc)
    assert result.verdict == "failed" and result.problems[0].startswith(
        "neuronx-cc-release: text_encoder (neuronx-cc 2.21"
    )

    other_tnx = RuntimeEnv(**{**WITH_SDK.__dict__, "torch_neuronx": "2.9.0.2.11.0"})
    assert [p.split(":")[0] for p in compatibility.check_compatibility(manifest, other_tnx).problems] == [
        "torch-neuronx-release"
    ]

    old_torch = RuntimeEnv(**{**WITH_SDK.__dict__, "torch": "2.7.1"})
    problems = compatibility.check_compatibility(manifest, old_torch).problems
    assert [p.split(":")[0] for p in problems] == ["torchscript-newer-torch"] and "torch 2.8.0, newer than" in problems[
        0
    ]

    old_diffusers = RuntimeEnv(**{**WITH_SDK.__dict__, "diffusers": "0.29.0"})
    assert [p.split(":")[0] for p in compatibility.check_compatibility(manifest, old_diffusers).problems] == [
        "diffusers-pipeline-class"
    ]
    no_class = RuntimeEnv(**{**WITH_SDK.__dict__, "diffusers_pipelines": frozenset({"StableDiffusionXLPipeline"})})
    assert "has no StableDiffusionPipeline" in compatibility.check_compatibility(manifest, no_class).problems[0]


def test_every_rule_has_a_one_line_reason():
    assert len({rule.id for rule in compatibility.RULES}) == len(compatibility.RULES) >= 5
    assert all(rule.reason and "\n" not in rule.reason for rule in compatibility.RULES)


def test_probe_environment_here_reports_the_missing_sdk():
    real = REAL_PROBE()  # the autouse fixture replaced verify.probe_environment for CLI runs
    assert real.torch and real.diffusers and not real.has_sdk and real.sdk_problem
    assert {
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "LatentConsistencyModelPipeline",
    } <= real.diffusers_pipelines


# ------------------------------------------------------------------------------------------ fit

# Parameter counts of the real checkpoints: their diffusers / transformers configs instantiated on the meta
# device (no weights allocated). They match the published sizes: SD 1.5 UNet 859.5M, CLIP ViT-L text 123M,
# SDXL UNet 2.57B, OpenCLIP bigG text encoder 694.7M, VAE 83.7M.
CLIP_L = 123_060_480  # SD 1.x text_encoder, SDXL text_encoder
OPENCLIP_H = 340_387_840  # SD 2.x text_encoder (the 23 layers diffusers keeps)
OPENCLIP_BIGG = 694_659_840  # SDXL text_encoder_2, with its projection
VAE = {"vae_encoder": 34_163_664, "vae_decoder": 49_490_199}  # encoder + quant_conv, decoder + post_quant_conv
SD15 = {"text_encoder": CLIP_L, "unet": 859_520_964, **VAE}
SD21 = {"text_encoder": OPENCLIP_H, "unet": 865_910_724, **VAE}
SD2_INPAINT = {"text_encoder": OPENCLIP_H, "unet": 865_925_124, **VAE}  # the UNet takes 9 input channels
SDXL = {"text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG, "unet": 2_567_463_684, **VAE}
SDXL_REFINER = {"text_encoder_2": OPENCLIP_BIGG, "unet": 2_259_526_660, **VAE}


def full_size(
    params: dict[str, int], height: int, width: int | None = None, artifact_bytes: int = 0, batch: int = 1
) -> list[ComponentFootprint]:
    """Real models' parameter counts at real shapes (artifact sizes 0: the estimate then uses 4 bytes/param)."""
    width = width or height
    h, w = height // 8, width // 8
    shapes = {
        "text_encoder": ((batch, 77),),
        "text_encoder_2": ((batch, 77),),
        "unet": ((batch, 4, h, w), (batch,)),
        "vae_encoder": ((batch, 3, height, width),),
        "vae_decoder": ((batch, 4, h, w),),
    }
    return [ComponentFootprint(name, count, artifact_bytes, shapes[name]) for name, count in params.items()]


# Where each published deployment comes from.
AWS_INF2_BENCHMARKS = (
    "AWS Neuron documentation, Inf2 Inference Performance, Stable Diffusion models "
    "(https://awsdocs-neuron.readthedocs-hosted.com/en/latest/general/benchmarks/inf2/inf2-performance.html; "
    "data file aws-neuron-sdk general/benchmarks/inf2/throughput_data_vision_sd.csv, batch 1, bf16 matmul auto-cast)"
)
DIFFUSERS_NEURON_DOC = (
    "diffusers documentation, AWS Neuron (https://huggingface.co/docs/diffusers/optimization/neuron; seed document "
    "001): SDXL 1024 compiled on inf2.8xlarge, 'switch to the cheaper inf2.xlarge' once compiled"
)
HOST_OOM_REPORTS = "shared/reference/field-notes.md: users report SDXL on inf2.xlarge running out of host memory"
OPTIMUM_REFINER_DOC = (
    "optimum-neuron Stable Diffusion tutorial (seed document 000): deletes the SDXL base before loading the "
    "refiner 'to avoid Neuron device OOM'"
)


@dataclass(frozen=True)
class Deployment:
    """A pipeline (or pipelines loaded together) that a public source runs on an instance."""

    name: str
    pipelines: tuple[tuple[dict[str, int], int, int], ...]  # (parameter counts, height, width), loaded together
    instance: str  # where the source runs it: verify must not refuse it there
    verdict: str  # "fits" (with room) or "tight" (the evidence is mixed), on that instance
    smallest: str  # the smallest instance verify must name
    sources: tuple[str, ...]


DEPLOYMENTS = (
    Deployment("SD 1.5 512x512", ((SD15, 512, 512),), "inf2.xlarge", "fits", "inf2.xlarge", (AWS_INF2_BENCHMARKS,)),
    Deployment("SD 2.1 512x512", ((SD21, 512, 512),), "inf2.xlarge", "fits", "inf2.xlarge", (AWS_INF2_BENCHMARKS,)),
    Deployment("SD 2.1 768x768", ((SD21, 768, 768),), "inf2.xlarge", "fits", "inf2.xlarge", (AWS_INF2_BENCHMARKS,)),
    Deployment(
        "SD 2 inpainting 936x624",
        ((SD2_INPAINT, 624, 936),),
        "inf2.xlarge",
        "fits",
        "inf2.xlarge",
        (AWS_INF2_BENCHMARKS,),
    ),
    # AWS ~12 s/image on inf2.xlarge and the diffusers doc say it runs; users report host OOM there: tight.
    Deployment(
        "SDXL base 1024x1024",
        ((SDXL, 1024, 1024),),
        "inf2.xlarge",
        "tight",
        "inf2.xlarge",
        (AWS_INF2_BENCHMARKS, DIFFUSERS_NEURON_DOC, HOST_OOM_REPORTS),
    ),
    # AWS runs both in one process on inf2.8xlarge; optimum-neuron unloads the base first to avoid device OOM: tight.
    Deployment(
        "SDXL base + refiner 1024x1024",
        ((SDXL, 1024, 1024), (SDXL_REFINER, 1024, 1024)),
        "inf2.8xlarge",
        "tight",
        "inf2.8xlarge",
        (AWS_INF2_BENCHMARKS, OPTIMUM_REFINER_DOC),
    ),
)


def real_counts(
    params: dict[str, int],
    height: int,
    width: int,
    mode: str = "unet",
    batch: int | None = None,
    auto_cast: str | None = None,
):
    """Turn a tiny export's manifest into a full-size one: real parameter counts and shapes, a Neuron build."""

    def change(data: dict) -> None:
        as_neuron_export(data)
        data["pipeline"].update(height=height, width=width, data_parallel_mode=mode)
        if auto_cast is not None:
            data["config"]["auto_cast"] = auto_cast
        for name, record in data["components"].items():
            record["parameter_count"] = params[name]
            for tensor in record["inputs"]:
                if batch is not None:
                    tensor["shape"][0] = batch
                if tensor["name"] in ("sample", "latent_sample") and len(tensor["shape"]) == 4:
                    scale = 1 if name == "vae_encoder" else 8
                    tensor["shape"][2:] = [height // scale, width // scale]

    return change


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d.name for d in DEPLOYMENTS])
def test_verify_agrees_with_published_deployments(deployment, sd_export, sdxl_export, copy, cli):
    target = BY_NAME[deployment.instance]
    if len(deployment.pipelines) == 1:  # one export: through the command, from a full-size manifest
        params, height, width = deployment.pipelines[0]
        directory = copy(sdxl_export if "text_encoder_2" in params else sd_export)
        rewrite_manifest(directory, real_counts(params, height, width))
        code, out, _ = cli("verify", directory, "--instance", target.name, "--json")
        fit = json.loads(out)["checks"]["fit"]
        assert code == 0 and json.loads(out)["checks"]["integrity"]["verdict"] == "ok", fit
        assert fit["verdict"] == "ok" and fit["details"]["smallest_fit"] == deployment.smallest
        tight = fit["summary"].startswith("fits, tight: ")
        assert tight == (deployment.verdict == "tight"), fit["summary"]
        return
    # pipelines loaded together (verify takes one export): the fit function on their footprints
    footprint = together(
        *(
            estimate(full_size(params, height, width), "unet", label=f"{index}/")
            for index, (params, height, width) in enumerate(deployment.pipelines)
        )
    )
    verdict = fits(footprint, target)
    assert verdict.fits and bool(verdict.tight) == (deployment.verdict == "tight"), (verdict.reasons, verdict.tight)
    assert smallest_fit(footprint, "inf2").name == deployment.smallest


def test_sdxl_base_plus_refiner_does_not_fit_inf2_xlarge_host_ram():
    base, refiner = estimate(full_size(SDXL, 1024), "unet"), estimate(full_size(SDXL_REFINER, 1024), "unet", label="r/")
    both = together(base, refiner)
    assert fits(base, BY_NAME["inf2.xlarge"]).fits and fits(refiner, BY_NAME["inf2.xlarge"]).fits  # each alone
    verdict = fits(both, BY_NAME["inf2.xlarge"])
    assert (
        not verdict.fits
        and len(verdict.reasons) == 1
        and verdict.reasons[0].startswith("host RAM: loading needs about 27")
    )
    assert both.host_bytes == base.host_bytes + refiner.host_bytes - footprint.HOST_BASE_BYTES  # one process


def test_a_tight_fit_exits_0_and_names_the_estimate_the_resource_and_the_assumption(sdxl_export, copy, cli):
    directory = copy(sdxl_export)
    rewrite_manifest(directory, real_counts(SDXL, 1024, 1024))
    code, out, _ = cli("verify", directory, "--instance", "inf2.xlarge")
    assert code == 0, out
    line = " ".join(out.split("\nfit ")[1].split("\n(--verbose")[0].split())  # the fit line, unwrapped
    assert line.startswith("OK fits, tight: 15.9 of 16 GiB host RAM on inf2.xlarge (assuming one fp32 host copy")
    assert line.endswith("; inf2.8xlarge has room")
    code, out, _ = cli("verify", directory, "--instance", "inf2.8xlarge")
    assert code == 0 and "fits inf2.8xlarge: the export needs about 15.9 GiB host RAM" in out


def test_a_component_on_both_cores_is_held_once_on_the_host():
    one_core = estimate(full_size(SDXL, 1024), "none")
    two_cores = estimate(full_size(SDXL, 1024), "unet")
    assert {c.name: c.copies for c in two_cores.components}["unet"] == 2
    assert two_cores.host_bytes == one_core.host_bytes
    assert two_cores.core_bytes[0] == one_core.core_bytes[0]  # core 1 holds only the second UNet replica
    assert (
        two_cores.core_bytes[1]
        == footprint.CORE_RESERVE_BYTES + {c.name: c for c in two_cores.components}["unet"].device_bytes
    )


def test_models_on_one_core_share_the_largest_activation_scratchpad():
    sdxl = estimate(full_size(SDXL, 1024), "unet")
    on_core_0 = [c for c in sdxl.components if 0 in c.cores]
    assert sdxl.core_bytes[0] == (
        footprint.CORE_RESERVE_BYTES
        + sum(c.device_weight_bytes for c in on_core_0)
        + max(c.activation_bytes for c in on_core_0)
    )
    assert len({c.activation_bytes for c in on_core_0}) > 1  # the VAEs need more scratch than the encoders


def test_an_export_that_does_not_fit_exits_5_and_names_the_resource(sdxl_export, copy, cli):
    directory = copy(sdxl_export)  # fp32 weights on the device and batch 2: NeuronCore 0 overflows
    rewrite_manifest(directory, real_counts(SDXL, 1024, 1024, batch=2, auto_cast="none"))
    code, out, _ = cli("verify", directory, "--instance", "inf2.xlarge", "--json")
    fit = json.loads(out)["checks"]["fit"]
    assert code == ExitCode.DOES_NOT_FIT == 5 and fit["verdict"] == "failed", fit["summary"]
    assert fit["problems"] == [fit["problems"][0]] and fit["problems"][0].startswith(
        "device memory: NeuronCore 0 needs about 17"
    )
    assert "smallest instance that fits: none in the table" in fit["summary"]
    code, out, _ = cli("verify", directory, "--instance", "inf2.xlarge")
    assert code == 5 and "does not fit inf2.xlarge" in out and "Traceback" not in out


def test_artifact_bytes_count_when_larger_than_the_weights():
    small = estimate(full_size(SD15, 512), "unet").host_bytes
    padded = estimate(full_size(SD15, 512, artifact_bytes=5 * GIB), "unet").host_bytes
    assert padded == footprint.HOST_BASE_BYTES + 5 * GIB * 4  # 4 components, each held once
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


def test_the_old_target_spelling_still_checks_the_fit_with_a_notice(sd_export, cli):
    new = cli("verify", sd_export, "--instance", "inf2.xlarge", "--json")
    code, out, err = cli("verify", sd_export, "--target", "inf2.xlarge", "--json")
    assert (code, out) == (new.exit_code, new.stdout) and json.loads(out)["instance"] == "inf2.xlarge"
    assert "verify --target is now --instance" in err and len(err.strip().splitlines()) == 1


def test_a_manifest_written_before_architecture_was_named_still_reads(sd_export, copy, cli):
    older = copy(sd_export)
    manifest = json.loads((older / "manifest.json").read_text())
    manifest["pipeline"]["kind"] = manifest["pipeline"].pop("architecture")
    (older / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    code, out, _ = cli("inspect", older, "--json")
    assert code == 0 and json.loads(out)["pipeline"]["architecture"] == "sd"
