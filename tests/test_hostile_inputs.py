"""Hostile local inputs: forged weight hashes, user folders beside our cache and exports, sources reaching
outside the model, lying headers and sizes. Each attack ends in one sentence (or does nothing), never in a
traceback, a deleted user file or a secret copied into an export."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from neuron_export.events import Stage

SECRET = "hunter2-do-not-ship"


def model_copy(tiny_model, tmp_path: Path, name: str = "model") -> Path:
    copy = tmp_path / name
    shutil.copytree(tiny_model("sd"), copy)
    return copy


def plan_keys(cli, model: Path, *extra: object) -> dict[str, str]:
    result = cli("plan", "sd", "-m", model, "--backend", "cpu", "--json", *extra)
    assert result.exit_code == 0, result
    return {job["component"]: job["cache_key"] for job in json.loads(result.stdout)["components"]}


def one_sentence_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result
    assert "Traceback" not in result.stderr + result.stdout, result
    return result.stderr + result.stdout


def everything_under(directory: Path) -> str:
    return "".join(p.read_bytes().decode(errors="replace") for p in directory.rglob("*") if p.is_file())


# --- 2. hashes are computed, not believed --------------------------------------------------------------


def test_a_symlink_named_like_the_genuine_blob_does_not_forge_the_key(cli, tiny_model, tmp_path):
    genuine = model_copy(tiny_model, tmp_path, "genuine")
    weights = genuine / "unet" / "diffusion_pytorch_model.safetensors"
    genuine_sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    # Laid out like a Hub cache, but not the Hub cache: the blob's name is the genuine hash, its bytes are not.
    repository = tmp_path / "hub-lookalike" / "models--org--genuine"
    altered = repository / "snapshots" / ("c" * 40)
    shutil.copytree(genuine, altered)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one weight changed; the header still says the same
    (repository / "blobs").mkdir()
    (repository / "blobs" / genuine_sha).write_bytes(bytes(data))
    target = altered / "unet" / "diffusion_pytorch_model.safetensors"
    target.unlink()
    target.symlink_to(Path("..", "..", "..", "blobs", genuine_sha))
    genuine_keys, altered_keys = plan_keys(cli, genuine), plan_keys(cli, altered)
    assert altered_keys["unet"] != genuine_keys["unet"]
    assert altered_keys["text_encoder"] == genuine_keys["text_encoder"]  # untouched parts still share their builds


# --- 3. we delete only what we made --------------------------------------------------------------------


def user_folders(cache: Path) -> list[Path]:
    mine = cache / "tmp" / "mine"
    mine.mkdir(parents=True)
    (mine / "thesis.txt").write_text("years of work")
    named_like_ours = cache / "tmp" / "0123456789abcdef-1-work"  # pid 1 never exits, but this is not ours
    named_like_ours.mkdir()
    foreign = cache / "components" / "x" / "y"
    foreign.mkdir(parents=True)
    (foreign / "record.json").write_text(json.dumps({"mine": True}))
    return [mine / "thesis.txt", named_like_ours, foreign / "record.json"]


def test_cache_dir_over_user_folders_deletes_none_of_them(cli, tiny_model, tmp_path):
    cache = tmp_path / "home"
    kept = user_folders(cache)
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out", "--cache-dir", cache)
    assert result.exit_code == 0, result
    for command in (["ls"], ["du"], ["verify"], ["prune", "--all"]):
        outcome = cli("cache", *command, "--cache-dir", cache)
        assert outcome.exit_code == 0, (command, outcome)
    assert all(path.exists() for path in kept), [path for path in kept if not path.exists()]
    assert not list(cache.glob("components/*/*/record.json"))[1:]  # our own entries were pruned; theirs stayed


def test_force_refuses_an_earlier_export_holding_a_user_file(cli, tiny_model, tmp_path):
    output = tmp_path / "out"
    assert cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output).exit_code == 0
    (output / "unet" / "notes.txt").write_text("mine")
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--height", "64", "--force")
    message = one_sentence_error(result)
    assert "unet/notes.txt" in message
    assert (output / "unet" / "notes.txt").read_text() == "mine"


def test_an_output_named_like_a_glob_never_touches_another_exports_staging(cli, tiny_model, tmp_path):
    live = tmp_path / ".exp1.partial-0badc0de"  # exp1's export is assembling here right now
    live.mkdir()
    (live / "model_index.json").write_text("{}")
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "exp[1]")
    assert result.exit_code == 0, result
    assert (live / "model_index.json").exists()


def test_a_second_export_to_one_output_is_refused_while_the_first_runs(cli, tiny_model, tmp_path):
    from filelock import FileLock

    output = tmp_path / "out"
    with FileLock(str(tmp_path / ".out.lock")):  # the first export holds its output's lock
        result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output)
    message = one_sentence_error(result)
    assert str(output) in message and "another export" in message
    assert not output.exists()


def test_prune_all_during_an_export_does_not_break_its_assembly(cli, tiny_model, tmp_path, isolated_cache):
    import neuron_export

    model = tiny_model("sd")
    assert cli("sd", "-m", model, "--backend", "cpu", "-o", tmp_path / "first").exit_code == 0
    pruned = []

    def prune_when_cached(event) -> None:
        if event.stage == Stage.CACHED and not pruned:
            pruned.append(cli("cache", "prune", "--all"))

    result = neuron_export.export(
        "sd", model=str(model), backend="cpu", output=tmp_path / "second", on_event=prune_when_cached
    )
    assert pruned and pruned[0].exit_code == 0, pruned
    assert "cached" in result.origins.values()  # held while it assembled; the others were pruned, then rebuilt
    assert all((tmp_path / "second" / name / "model.neuron").is_file() for name in result.origins)


# --- 5. sources stay inside the source -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["file", "folder"])
def test_a_processor_symlink_outside_the_model_is_refused(cli, tiny_model, tmp_path, how):
    model = model_copy(tiny_model, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    if how == "file":
        link = model / "tokenizer" / "secret.txt"
        link.symlink_to(outside / "secret.txt")
    else:
        for name in (model / "tokenizer").iterdir():
            shutil.copy(name, outside / name.name)
        shutil.rmtree(model / "tokenizer")
        link = model / "tokenizer"
        link.symlink_to(outside, target_is_directory=True)
    output = tmp_path / "out"
    result = cli("sd", "-m", model, "--backend", "cpu", "-o", output)
    message = one_sentence_error(result)
    assert str(link) in message
    assert not output.exists() or SECRET not in everything_under(output)


def test_a_config_symlinked_outside_the_model_is_refused(cli, tiny_model, tmp_path):
    model = model_copy(tiny_model, tmp_path)
    outside = tmp_path / "elsewhere.json"
    outside.write_text((model / "vae" / "config.json").read_text())
    (model / "vae" / "config.json").unlink()
    (model / "vae" / "config.json").symlink_to(outside)
    message = one_sentence_error(cli("plan", "sd", "-m", model, "--backend", "cpu"))
    assert "vae/config.json" in message


def shard_index(model: Path, shards: list[str], pickled: bool = False) -> None:
    unet = model / "unet"
    for weights in unet.glob("diffusion_pytorch_model.*"):
        weights.unlink()
    name = "diffusion_pytorch_model.bin.index.json" if pickled else "diffusion_pytorch_model.safetensors.index.json"
    (unet / name).write_text(json.dumps({"weight_map": {f"w{i}": shard for i, shard in enumerate(shards)}}))


def test_a_shard_index_naming_dev_zero_is_refused_not_read(tiny_model, tmp_path):
    model = model_copy(tiny_model, tmp_path)
    shard_index(model, ["/dev/zero"], pickled=True)
    try:  # run apart: reading /dev/zero never ends
        done = subprocess.run(
            [sys.executable, "-m", "neuron_export", "plan", "sd", "-m", str(model), "--backend", "cpu"],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("plan kept reading /dev/zero")
    assert done.returncode == 2, done
    assert "/dev/zero" in done.stderr and "Traceback" not in done.stderr


def test_a_shard_outside_the_model_is_refused(cli, tiny_model, tmp_path):
    model = model_copy(tiny_model, tmp_path)
    shutil.copy(model / "unet" / "diffusion_pytorch_model.safetensors", tmp_path / "stolen.safetensors")
    shard_index(model, ["../../stolen.safetensors"])
    message = one_sentence_error(cli("plan", "sd", "-m", model, "--backend", "cpu"))
    assert "stolen.safetensors" in message


# --- 6. bounds and one sentence everywhere -------------------------------------------------------------


def test_a_config_sample_size_obeys_the_size_limits(cli, tiny_model, tmp_path):
    model = model_copy(tiny_model, tmp_path)
    config = json.loads((model / "unet" / "config.json").read_text())
    config["sample_size"] = 30000
    (model / "unet" / "config.json").write_text(json.dumps(config))
    message = one_sentence_error(cli("plan", "sd", "-m", model, "--backend", "cpu"))
    assert "sample_size" in message and "4096" in message
    assert cli("plan", "sd", "-m", model, "--backend", "cpu", "--height", "64", "--width", "64").exit_code == 0


def rewrite_header(path: Path, change) -> None:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size :])


def first_tensor(header: dict) -> dict:
    return next(value for key, value in header.items() if key != "__metadata__")


@pytest.mark.parametrize("lie", ["zero dim", "negative dim", "no offsets", "not a list"])
def test_a_lying_safetensors_header_is_one_sentence(cli, tiny_model, tmp_path, lie):
    model = model_copy(tiny_model, tmp_path)
    changes = {
        "zero dim": lambda h: first_tensor(h).update(shape=[0, *first_tensor(h)["shape"][1:]]),
        "negative dim": lambda h: first_tensor(h).update(shape=[-4, -4]),
        "no offsets": lambda h: first_tensor(h).pop("data_offsets"),
        "not a list": lambda h: first_tensor(h).update(shape="big"),
    }
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    rewrite_header(weights, changes[lie])
    message = one_sentence_error(cli("plan", "sd", "-m", model, "--backend", "cpu"))
    assert str(weights) in message


def test_a_lora_with_a_lying_header_is_one_sentence(cli, tiny_model, tmp_path):
    from neuron_export.testing.lora import build_lora

    file = build_lora(tiny_model("sd"), tmp_path / "lora")
    rewrite_header(file, lambda h: h.update({next(key for key in h if key != "__metadata__"): 5}))
    message = one_sentence_error(cli("plan", "sd", "-m", tiny_model("sd"), "--backend", "cpu", "--lora", file))
    assert file.name in message


def test_a_shape_matrix_has_a_cap(cli, tiny_model):
    sides = ",".join(str(64 + 8 * i) for i in range(5))
    message = one_sentence_error(
        cli(
            "plan",
            "sd",
            "-m",
            tiny_model("sd"),
            "--backend",
            "cpu",
            "--height",
            sides,
            "--width",
            sides,
            "--batch-size",
            "1,2,3",
        )
    )
    assert "75" in message and "64" in message


@pytest.mark.parametrize("value", ["height=[64", "height={a: [", "components=: :", "height=!!python/object:os.system"])
def test_a_malformed_set_value_is_one_sentence(cli, tiny_model, value):
    config = Path(__file__).parent.parent / "configs" / "sd15-512.yaml"
    message = one_sentence_error(cli("plan", "build", config, "--set", f"model={tiny_model('sd')}", "--set", value))
    assert f"--set {value!r}" in message


def test_a_cache_dir_that_is_not_a_directory_is_one_sentence(cli, tiny_model, tmp_path):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("mine")
    message = one_sentence_error(
        cli("plan", "sd", "-m", tiny_model("sd"), "--backend", "cpu", "--cache-dir", not_a_folder)
    )
    assert str(not_a_folder) in message and not_a_folder.read_text() == "mine"


def test_a_config_file_that_is_not_text_is_one_sentence(cli, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"\xff\xfe\x00family: sd")
    message = one_sentence_error(cli("plan", "build", config))
    assert str(config) in message


def test_a_dangling_symlink_output_is_one_sentence(cli, tiny_model, tmp_path):
    output = tmp_path / "out"
    output.symlink_to(tmp_path / "gone")
    message = one_sentence_error(cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--force"))
    assert str(output) in message
    assert output.is_symlink() and not (tmp_path / "gone").exists()


def test_an_output_that_is_not_a_directory_is_one_sentence(cli, tiny_model, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    message = one_sentence_error(cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", fifo, "--force"))
    assert str(fifo) in message


def test_an_empty_cache_answers_every_cache_command(cli, tmp_path):
    cache = tmp_path / "never-used"
    for command in (["ls"], ["du"], ["verify"], ["prune", "--all"]):
        result = cli("cache", *command, "--cache-dir", cache)
        assert result.exit_code == 0, (command, result)
    assert not cache.exists()  # looking at a cache creates nothing
