"""A shared remote cache: a second machine downloads instead of building, bad remote entries are rebuilt and
replaced, a killed upload leaves nothing readers accept, an unreachable remote degrades (or fails when
required). S3 through a real S3 API server (moto's, on 127.0.0.1), NFS-style sharing through file://.
Writers sign with a key made by `cache keygen`; readers trust its public key (tests/test_trust.py: the attacks)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import run_cli, warnings
from s3_server import free_port, make_bucket

NAMES = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]


def origins(result) -> dict[str, str]:
    assert result.exit_code == 0, result
    return {name: component["origin"] for name, component in json.loads(result.stdout)["components"].items()}


def file_hashes(directory: Path, leave_out: tuple[str, ...] = ()) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in leave_out
    }


def s3():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture(scope="module")
def signer(tmp_path_factory) -> tuple[Path, str]:
    """The team's key pair, as `cache keygen` makes it: the private key file and the public key it printed."""
    key = tmp_path_factory.mktemp("keys") / "cache-key"
    made = run_cli("cache", "keygen", key)
    assert made.exit_code == 0, made
    return key, made.stdout.strip()


def signs(signer) -> list[object]:
    return ["--remote-cache-signing-key", signer[0]]


def trusts(signer) -> list[object]:
    return ["--remote-cache-trusted-key", signer[1]]


@pytest.fixture(scope="module")
def warm(s3_endpoint, tiny_model, tmp_path_factory, signer):
    """The first machine: a cold export of the tiny SD with the remote cache, so every component is built and
    uploaded, signed. Returns its local cache, its output and the remote URL."""
    root = tmp_path_factory.mktemp("first-machine")
    url = make_bucket("warm")
    result = run_cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "-o",
        root / "out",
        "--cache-dir",
        root / "cache",
        "--remote-cache",
        url,
        *signs(signer),
        "--json",
    )
    assert origins(result) == dict.fromkeys(NAMES, "built")
    return root / "cache", root / "out", url


def test_a_second_machine_downloads_every_component_and_writes_the_same_export(warm, cli, tiny_model, tmp_path, signer):
    _, first_output, url = warm
    output = tmp_path / "out"
    result = cli(
        "sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--remote-cache", url, *trusts(signer), "--json"
    )
    assert origins(result) == dict.fromkeys(NAMES, "downloaded")  # builds: 0
    assert "warning" not in result.stderr  # --json keeps progress on stderr; no remote entry was refused
    # Every file byte-identical; the manifest differs only in saying where each component came from, who
    # signed it, and that its validation is the signer's report (measured by the first machine: reused).
    assert file_hashes(output, ("manifest.json",)) == file_hashes(first_output, ("manifest.json",))
    first, second = (json.loads((d / "manifest.json").read_text()) for d in (first_output, output))
    for name in NAMES:
        ours, theirs = first["components"][name], second["components"][name]
        assert (ours.pop("origin"), ours.pop("remote"), ours.pop("signed_by"), ours.pop("signature")) == (
            "built",
            None,
            None,
            None,
        )
        assert (theirs.pop("origin"), theirs.pop("remote"), theirs.pop("signed_by")) == ("downloaded", url, signer[1])
        assert (
            theirs.pop("signature")
            and theirs["validation"].pop("by") == "signer"
            and ours["validation"].pop("by") is None
        )
        reused = [manifest["components"][name]["validation"].pop("reused") for manifest in (first, second)]
        assert reused == [False, True]
    assert second == first


def test_a_corrupted_remote_object_is_rejected_rebuilt_and_replaced(warm, cli, tiny_model, tmp_path, signer):
    first_cache, first_output, _ = warm
    url = make_bucket("corrupt")
    pushed = cli("cache", "push", "--cache-dir", first_cache, "--remote-cache", url, *signs(signer))
    assert pushed.stdout.endswith("pushed 4 entries to " + url + "\n"), pushed
    key = json.loads((first_output / "manifest.json").read_text())["components"]["unet"]["cache_key"]
    (stored,) = s3().glob(f"corrupt/cache/{key}/*/model.neuron")
    data = bytearray(s3().cat_file(stored))
    data[len(data) // 2] ^= 0xFF
    s3().pipe_file(stored, bytes(data))

    result = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "-o",
        tmp_path / "out",
        "--remote-cache",
        url,
        *signs(signer),
        "--json",
    )
    assert origins(result) == {
        "text_encoder": "downloaded",
        "unet": "built",
        "vae_encoder": "downloaded",
        "vae_decoder": "downloaded",
    }
    (warning,) = warnings(result.stderr)
    assert warning.startswith(
        f"neuron-export: warning: the remote cache entry {key[:12]} in {url} is bad (model.neuron does not match"
    )
    assert stored not in s3().find("corrupt")  # the bad upload is gone ...
    verify = cli("cache", "verify", "--remote", "--remote-cache", url)  # ... and a good one replaced it
    assert verify.exit_code == 0 and "4 of 4 entries intact" in verify.stdout, verify


def test_a_killed_upload_leaves_nothing_readers_accept(s3_endpoint, tiny_model, tmp_path, cli, signer):
    url = make_bucket("killed")
    # The exporter itself, with its S3 uploads made to stop after the first file: it is killed right there.
    driver = textwrap.dedent("""
        import asyncio, sys
        import s3fs
        original = s3fs.S3FileSystem._put_file
        async def put_then_stall(self, *args, **kwargs):
            await original(self, *args, **kwargs)
            print("UPLOADED ONE FILE", flush=True)
            await asyncio.sleep(3600)
        s3fs.S3FileSystem._put_file = put_then_stall
        from neuron_export.cli.main import main
        main(sys.argv[1:])
    """)
    command = [
        sys.executable,
        "-c",
        driver,
        "sd",
        "-m",
        str(tiny_model("sd")),
        "--backend",
        "cpu",
        "--components",
        "vae_decoder",
        "-o",
        str(tmp_path / "killed"),
        "--cache-dir",
        str(tmp_path / "cache-a"),
        "--remote-cache",
        url,
        "--remote-cache-signing-key",
        str(signer[0]),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "UPLOADED ONE FILE" in line:
                break
        assert "UPLOADED ONE FILE" in lines[-1], "".join(lines)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
    assert s3().glob("killed/cache/*/*/model.neuron")  # killed mid-upload: a file is there, its marker is not
    assert run_cli("cache", "ls", "--remote", "--remote-cache", url).stdout == ""

    reader = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "--components",
        "vae_decoder",
        "-o",
        tmp_path / "out",
        "--remote-cache",
        url,
        *signs(signer),
        "--json",
    )
    assert origins(reader) == {"vae_decoder": "built"}  # nothing half-uploaded was used
    listing = cli("cache", "ls", "--remote", "--remote-cache", url).stdout.splitlines()
    assert len(listing) == 1 and "vae_decoder" in listing[0]  # the reader's own upload completed


def test_an_unreachable_remote_warns_once_and_builds_locally(s3_endpoint, cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    args = [
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "--components",
        "vae_decoder",
        "--remote-cache",
        "s3://gone/cache",
    ]
    result = cli(*args, "--height", "64,72", "-o", tmp_path / "matrix", "--json")  # two exports, one warning
    assert result.exit_code == 0, result
    assert [e["components"]["vae_decoder"]["origin"] for e in json.loads(result.stdout)["exports"]] == [
        "built",
        "built",
    ]
    (warning,) = warnings(result.stderr)
    assert warning.startswith("neuron-export: warning: the remote cache s3://gone/cache cannot be used (connecting: ")
    assert warning.endswith("building locally without it.")

    required = cli(*args, "-o", tmp_path / "required", "--remote-cache-required")
    assert required.exit_code == 1, required
    (error,) = required.stderr.splitlines()
    assert error.startswith("neuron-export: error: The remote cache s3://gone/cache cannot be used (connecting: ")
    assert error.endswith("or drop --remote-cache-required to build locally.")
    assert "loading" not in required.stdout and not (tmp_path / "required").exists()


def test_a_file_remote_shares_exports_and_seeds_with_push_and_pull(
    warm, cli, tiny_model, tmp_path, monkeypatch, signer
):
    first_cache, first_output, _ = warm
    url = f"file://{tmp_path / 'shared'}"
    pushed = cli("cache", "push", "--cache-dir", first_cache, "--remote-cache", url, *signs(signer))
    assert pushed.exit_code == 0 and pushed.stdout.splitlines()[-1] == f"pushed 4 entries to {url}", pushed
    monkeypatch.setenv("NEURON_EXPORT_REMOTE_CACHE", url)
    monkeypatch.setenv("NEURON_EXPORT_REMOTE_CACHE_TRUSTED_KEYS", f"{signer[0]}.pub")  # the public key's file
    listing = cli("cache", "ls", "--remote").stdout.splitlines()
    assert sorted(line.split()[1] for line in listing) == sorted(NAMES)
    assert cli("cache", "du", "--remote").stdout.splitlines()[-1].endswith(f"in {url}")

    downloaded = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out", "--json")
    assert origins(downloaded) == dict.fromkeys(NAMES, "downloaded")
    assert file_hashes(tmp_path / "out", ("manifest.json",)) == file_hashes(first_output, ("manifest.json",))

    pulled = cli("cache", "pull", "--cache-dir", tmp_path / "pulled")
    assert pulled.stdout.splitlines()[-1].startswith("pulled 4 entries"), pulled
    monkeypatch.delenv("NEURON_EXPORT_REMOTE_CACHE")
    offline = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "-o",
        tmp_path / "from-pulled",
        "--cache-dir",
        tmp_path / "pulled",
        "--json",
    )
    assert origins(offline) == dict.fromkeys(NAMES, "cached")

    pruned = cli("cache", "prune", "--all", "--remote", "--remote-cache", url)
    assert pruned.stdout.splitlines()[-1].startswith("removed 4 entries"), pruned
    assert cli("cache", "ls", "--remote", "--remote-cache", url).stdout == ""


def test_a_bad_remote_cache_url_is_refused_in_one_sentence(cli, tiny_model, tmp_path, monkeypatch):
    args = ["sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out"]
    cases = {
        (
            "--remote-cache",
            "ftp2://host/x",
        ): "remote_cache 'ftp2://host/x' has an unknown scheme 'ftp2'; use s3://bucket/prefix,",
        ("--remote-cache", "/mnt/shared"): "remote_cache '/mnt/shared' has no scheme; write it as s3://bucket/prefix,",
        (
            "--remote-cache-required",
        ): "remote_cache_required is set but no remote cache is given; pass --remote-cache URL",
    }
    for flags, sentence in cases.items():
        result = cli(*args, *flags)
        assert result.exit_code == 2 and result.stderr.startswith(f"neuron-export: error: {sentence}"), result
        assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
    monkeypatch.setenv("NEURON_EXPORT_REMOTE_CACHE", "nowhere")
    result = cli(*args)
    assert result.exit_code == 2 and "NEURON_EXPORT_REMOTE_CACHE 'nowhere' has no scheme" in result.stderr, result
    assert not (tmp_path / "out").exists()
