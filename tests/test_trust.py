"""Attacks on the shared remote cache, from someone who can write to the bucket (any CI runner with upload
credentials): a poisoned archive with a fixed-up record, an entry signed by a stranger, an oversized file, a
record of another component, a record with no files, a symlink in a file:// remote, a read-only remote holding
a bad entry, a killed pull, a tampered manifest signature, an unwritable remote with --remote-cache-required.
The victim's team signs its uploads (`cache keygen`) and trusts that public key."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import run_cli, warnings
from s3_server import make_bucket

UPLOAD = "20260101000000-attacker0000"


class Payload(torch.nn.Module):
    """A TorchScript archive whose unpickling (torch.jit.load) writes a file: what a poisoned entry runs."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.hits = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        self.hits = int(torch.from_file(self.marker, shared=True, size=8, dtype=torch.uint8).fill_(88).sum())


def payload(marker: Path, directory: Path) -> bytes:
    path = directory / "payload.neuron"
    torch.jit.save(torch.jit.script(Payload(str(marker))), str(path))
    return path.read_bytes()


def sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> dict[str, Any]:
    """The team's key pair, a stranger's, and an honest build of the tiny SD in a local cache (with its keys)."""
    root = tmp_path_factory.mktemp("team")
    keys = {}
    for who in ("team", "stranger"):
        made = run_cli("cache", "keygen", root / who)
        assert made.exit_code == 0, made
        keys[who] = (root / who, made.stdout.strip())
    return {"root": root, "keys": keys}


@pytest.fixture(scope="module")
def honest(team, tiny_model) -> dict[str, Any]:
    root = team["root"]
    result = run_cli(
        "sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", root / "out", "--cache-dir", root / "cache"
    )
    assert result.exit_code == 0, result
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    keys = {name: component["cache_key"] for name, component in manifest["components"].items()}
    return {"cache": root / "cache", "out": root / "out", "keys": keys}


def local_record(cache: Path, key: str) -> dict[str, Any]:
    return json.loads((cache / "components" / key[:2] / key / "record.json").read_text())


def remote_fs(kind: str, tmp_path: Path, name: str) -> tuple[Any, str, str]:
    """A filesystem, the remote's root in it, and its URL: a file:// directory or a bucket on the moto server."""
    import fsspec

    if kind == "file":
        root = str(tmp_path / name)
        os.makedirs(root)
        return fsspec.filesystem("file"), root, f"file://{root}"
    url = make_bucket(name)
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False), url[len("s3://") :], url


def plant(
    fs: Any,
    root: str,
    key: str,
    record: dict[str, Any],
    files: dict[str, bytes],
    signer: tuple[Path, str] | None = None,
) -> None:
    """What an attacker with write access does: files under an upload folder, then a record.json naming them."""
    from neuron_export.manifest import ComponentRecord
    from neuron_export.signing import load_private, sign

    record = {**record, "cache_key": key, "origin": None, "remote": None}
    fs.makedirs(f"{root}/{key}/{UPLOAD}", exist_ok=True)  # a directory on file://, nothing on S3
    for name, data in files.items():
        fs.pipe_file(f"{root}/{key}/{UPLOAD}/{name}", data)
    marker: dict[str, Any] = {"format": 1, "upload": UPLOAD, "uploaded_from": "attacker", "record": record}
    if signer is not None:
        marker["signed_by"] = signer[1]
        marker["signature"] = sign(load_private(signer[0]), key, ComponentRecord.model_validate(record))
    fs.pipe_file(f"{root}/{key}/record.json", json.dumps(marker).encode())


def poisoned_unet(honest, marker: Path, directory: Path) -> tuple[dict[str, Any], bytes]:
    """The honest UNet record with model.neuron swapped for the payload, its sha256 and size fixed up."""
    data = payload(marker, directory)
    record = local_record(honest["cache"], honest["keys"]["unet"])
    record["files"] = [{"path": "unet/model.neuron", "sha256": sha256(data), "size": len(data)}]
    return record, data


def origins(result) -> dict[str, str]:
    assert result.exit_code == 0, result
    return {name: c["origin"] for name, c in json.loads(result.stdout)["components"].items()}


def trusting(team) -> list[Any]:
    return ["--remote-cache-trusted-key", team["keys"]["team"][1]]


@pytest.mark.parametrize("kind", ["file", "s3"])
@pytest.mark.parametrize("signed_by", [None, "stranger"], ids=["unsigned", "stranger"])
def test_a_poisoned_entry_is_never_loaded(kind, signed_by, request, team, honest, tiny_model, tmp_path, cli):
    if kind == "s3":
        request.getfixturevalue("s3_endpoint")
    fs, root, url = remote_fs(kind, tmp_path, f"poison-{kind}-{signed_by or 'unsigned'}")
    marker = tmp_path / "pwned"
    record, data = poisoned_unet(honest, marker, tmp_path)
    plant(
        fs, root, honest["keys"]["unet"], record, {"model.neuron": data}, team["keys"][signed_by] if signed_by else None
    )
    assert not marker.exists()

    victim = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "-o",
        tmp_path / "out",
        "--remote-cache",
        url,
        *trusting(team),
        "--json",
    )
    assert origins(victim)["unet"] == "built"
    (warning,) = warnings(victim.stderr)  # one line, whatever the number of untrusted entries
    assert warning.startswith(f"neuron-export: warning: the remote cache {url} holds entries no trusted key signed "), (
        warning
    )
    assert ("unsigned" if signed_by is None else team["keys"]["stranger"][1]) in warning
    import neuron_export

    neuron_export.load(tmp_path / "out")  # runs every archive of the export: none is the attacker's
    assert not marker.exists()
    assert (tmp_path / "out" / "unet" / "model.neuron").read_bytes() != data
    assert cli("verify", tmp_path / "out", *trusting(team)).exit_code == 0


def test_an_oversized_remote_file_is_never_written_past_its_recorded_size(team, honest, tiny_model, tmp_path, cli):
    """The victim runs with a file-size limit (RLIMIT_FSIZE) a little above the real artifact: a download that
    wrote the attacker's extra bytes would hit it; bounded, the entry is refused and the UNet built here."""
    fs, root, url = remote_fs("file", tmp_path, "oversized")
    pushed = cli(
        "cache",
        "push",
        "--cache-dir",
        honest["cache"],
        "--remote-cache",
        url,
        "--remote-cache-signing-key",
        team["keys"]["team"][0],
    )
    assert pushed.exit_code == 0, pushed
    key = honest["keys"]["unet"]
    (stored,) = Path(root).glob(f"{key}/*/model.neuron")
    size = stored.stat().st_size
    largest = max(p.stat().st_size for p in honest["cache"].rglob("*") if p.is_file())
    limit = 2 * largest + 2**20
    with stored.open("ab") as handle:  # record.json (signed, untouched) still says `size`
        handle.truncate(size + limit + 2**20)

    command = [
        sys.executable,
        "-c",
        textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from neuron_export.cli.main import main
        main(sys.argv[1:])
    """),
        "sd",
        "-m",
        str(tiny_model("sd")),
        "--backend",
        "cpu",
        "-o",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "victim-cache"),
        "--remote-cache",
        url,
        *map(str, trusting(team)),
        "--json",
    ]
    victim = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert victim.returncode == 0, victim.stderr[-2000:]
    assert json.loads(victim.stdout)["components"]["unet"]["origin"] == "built"
    (warning,) = warnings(victim.stderr)
    assert (
        f"the remote cache entry {key[:12]} in {url} is bad (model.neuron is larger than its recorded {size} bytes)"
        in warning
    )
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # only the victim was limited


def test_a_record_of_another_component_is_refused(team, honest, tiny_model, tmp_path, cli):
    """In a private bucket (unsigned entries allowed) the VAE decoder's entry is planted under the UNet's key."""
    fs, root, url = remote_fs("file", tmp_path, "swapped")
    decoder = honest["cache"] / "components" / honest["keys"]["vae_decoder"][:2] / honest["keys"]["vae_decoder"]
    plant(
        fs,
        root,
        honest["keys"]["unet"],
        local_record(honest["cache"], honest["keys"]["vae_decoder"]),
        {"model.neuron": (decoder / "model.neuron").read_bytes()},
    )
    victim = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "-o",
        tmp_path / "out",
        "--remote-cache",
        url,
        "--remote-cache-allow-unsigned",
        "--json",
    )
    assert origins(victim)["unet"] == "built"
    (warning,) = warnings(victim.stderr)
    assert "is bad (its record is for vae_decoder, not unet)" in warning, warning
    assert (tmp_path / "out" / "unet" / "model.neuron").read_bytes() == (
        honest["out"] / "unet" / "model.neuron"
    ).read_bytes()


def test_a_record_with_no_files_is_bad_not_intact(team, honest, tiny_model, tmp_path, cli):
    fs, root, url = remote_fs("file", tmp_path, "empty")
    record = {**local_record(honest["cache"], honest["keys"]["unet"]), "files": []}
    plant(fs, root, honest["keys"]["unet"], record, {}, team["keys"]["team"])  # even signed by the team's key
    victim = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "--components",
        "unet",
        "-o",
        tmp_path / "out",
        "--remote-cache",
        url,
        *trusting(team),
        "--json",
    )
    assert origins(victim) == {"unet": "built"}
    assert "is bad (its record.json lists no files)" in victim.stderr

    plant(fs, root, honest["keys"]["unet"], record, {}, team["keys"]["team"])  # the victim removed it: again
    checked = cli("cache", "verify", "--remote", "--remote-cache", url)
    assert checked.exit_code == 3, checked
    assert checked.stdout.splitlines() == [
        f"removed {honest['keys']['unet'][:12]} (its record.json lists no files)",
        "0 of 1 entries intact",
    ]


def test_a_symlink_in_a_file_remote_is_not_followed(team, honest, tiny_model, tmp_path, cli):
    fs, root, url = remote_fs("file", tmp_path, "linked")
    assert (
        cli(
            "cache",
            "push",
            "--cache-dir",
            honest["cache"],
            "--remote-cache",
            url,
            "--remote-cache-signing-key",
            team["keys"]["team"][0],
        ).exit_code
        == 0
    )
    key = honest["keys"]["unet"]
    (stored,) = Path(root).glob(f"{key}/*/model.neuron")
    elsewhere = tmp_path / "elsewhere.neuron"
    stored.rename(elsewhere)
    stored.symlink_to(elsewhere)  # the same bytes: only the link is wrong
    victim = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "--components",
        "unet",
        "-o",
        tmp_path / "out",
        "--remote-cache",
        url,
        *trusting(team),
        "--json",
    )
    assert origins(victim) == {"unet": "built"}
    assert "model.neuron is a symbolic link, which is never followed" in victim.stderr, victim


def test_a_bad_entry_on_a_read_only_remote_is_skipped_and_named(team, honest, tiny_model, tmp_path, cli, monkeypatch):
    fs, root, url = remote_fs("file", tmp_path, "read-only")
    assert (
        cli(
            "cache",
            "push",
            "--cache-dir",
            honest["cache"],
            "--remote-cache",
            url,
            "--remote-cache-signing-key",
            team["keys"]["team"][0],
        ).exit_code
        == 0
    )
    key = honest["keys"]["unet"]
    (stored,) = Path(root).glob(f"{key}/*/model.neuron")
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    import errno

    from fsspec.implementations.local import LocalFileSystem

    def read_only(self, path, *args, **kwargs):  # what a read-only mount answers (chmod does not stop root)
        raise OSError(errno.EROFS, "Read-only file system", path if isinstance(path, str) else path[0])

    monkeypatch.setattr(LocalFileSystem, "rm", read_only)
    monkeypatch.setattr(LocalFileSystem, "rm_file", read_only)
    victim = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "--components",
        "unet",
        "-o",
        tmp_path / "out",
        "--remote-cache",
        url,
        *trusting(team),
        "--json",
    )
    assert origins(victim) == {"unet": "built"}
    (warning,) = warnings(victim.stderr)
    assert (
        f"the remote cache entry {key[:12]} in {url} is bad (model.neuron does not match its recorded sha256)"
        in warning
    )
    assert "could not be removed there ([Errno 30] Read-only file system" in warning and warning.endswith(
        f"remove it from {url}."
    )


def test_cache_pull_cleans_up_a_killed_pull(team, honest, tmp_path, cli):
    fs, root, url = remote_fs("file", tmp_path, "pulled")
    assert (
        cli(
            "cache",
            "push",
            "--cache-dir",
            honest["cache"],
            "--remote-cache",
            url,
            "--remote-cache-signing-key",
            team["keys"]["team"][0],
        ).exit_code
        == 0
    )
    cache = tmp_path / "cache"
    driver = textwrap.dedent("""
        import os, signal, sys
        import neuron_export.store.remote as remote
        original = remote.stream
        def stream_then_die(*args):
            original(*args)
            os.kill(os.getpid(), signal.SIGKILL)  # killed with a file downloaded, the entry not yet stored
        remote.stream = stream_then_die
        from neuron_export.cli.main import main
        main(sys.argv[1:])
    """)
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            driver,
            "cache",
            "pull",
            "--cache-dir",
            str(cache),
            "--remote-cache",
            url,
            *map(str, trusting(team)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [p for p in (cache / "tmp").iterdir() if any(p.iterdir())]  # a partial download was left behind
    pulled = cli("cache", "pull", "--cache-dir", cache, "--remote-cache", url, *trusting(team))
    assert pulled.stdout.splitlines()[-1].startswith("pulled 4 entries"), pulled
    assert list((cache / "tmp").iterdir()) == []


def test_verify_detects_a_tampered_signature(team, honest, tiny_model, tmp_path, cli):
    fs, root, url = remote_fs("file", tmp_path, "signed")
    assert (
        cli(
            "cache",
            "push",
            "--cache-dir",
            honest["cache"],
            "--remote-cache",
            url,
            "--remote-cache-signing-key",
            team["keys"]["team"][0],
        ).exit_code
        == 0
    )
    out = tmp_path / "out"
    downloaded = cli(
        "sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", out, "--remote-cache", url, *trusting(team), "--json"
    )
    assert set(origins(downloaded).values()) == {"downloaded"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"]["unet"]["signed_by"] == team["keys"]["team"][1]
    assert cli("verify", out, *trusting(team)).exit_code == 0
    stranger = cli("verify", out, "--remote-cache-trusted-key", team["keys"]["stranger"][1])
    assert (
        stranger.exit_code == 3
        and f"unet: signed by {team['keys']['team'][1]}, which is not a trusted key" in stranger.stdout
    )

    manifest["components"]["unet"]["inputs"][0]["shape"][0] = 2  # what the signature covers, changed
    (out / "manifest.json").write_text(json.dumps(manifest))
    tampered = cli("verify", out)
    assert tampered.exit_code == 3, tampered
    assert f"unet: its signature by {team['keys']['team'][1]} does not match its record (tampered)" in tampered.stdout


def test_a_required_remote_that_cannot_be_written_fails_before_any_build(team, tiny_model, tmp_path, cli):
    (tmp_path / "a-file").write_text("not a directory")
    url = f"file://{tmp_path / 'a-file' / 'cache'}"
    result = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "-o",
        tmp_path / "out",
        "--cache-dir",
        tmp_path / "cache",
        "--remote-cache",
        url,
        "--remote-cache-required",
        "--remote-cache-signing-key",
        team["keys"]["team"][0],
    )
    assert result.exit_code == 1, result
    (error,) = result.stderr.splitlines()
    assert error.startswith(f"neuron-export: error: The remote cache {url} cannot be used (writing a probe: "), error
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "components").exists()


def test_keygen_never_overwrites_and_keys_are_checked(tmp_path, cli, tiny_model):
    key = tmp_path / "key"
    made = cli("cache", "keygen", key)
    assert made.exit_code == 0 and made.stdout.startswith("ed25519:"), made
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "key.pub").read_text().strip() == made.stdout.strip()
    again = cli("cache", "keygen", key)
    assert again.exit_code == 2 and f"{key} already exists; pass --force" in again.stderr, again
    assert cli("cache", "keygen", key, "--force").stdout != made.stdout
    bad = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "--remote-cache",
        f"file://{tmp_path}/r",
        "--remote-cache-trusted-key",
        "ed25519:nope",
        "-o",
        tmp_path / "out",
    )
    assert bad.exit_code == 2 and "--remote-cache-trusted-key 'ed25519:nope' is not 32 bytes long" in bad.stderr, bad
    bad = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "--remote-cache",
        f"file://{tmp_path}/r",
        "--remote-cache-signing-key",
        tmp_path / "key.pub",
        "-o",
        tmp_path / "out",
    )
    assert bad.exit_code == 2 and "is not an unencrypted PEM private key" in bad.stderr, bad
