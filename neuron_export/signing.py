"""Ed25519 signatures of remote cache entries: the writer signs what an entry claims to be (its cache key, its
component and compiled input shapes, every file's name, size and sha256); a reader uses an entry only when a
key it trusts signed it, as Nix binary caches do with trusted-public-keys. Shared by the remote cache
(store/remote.py) and `verify` (deploy/), which checks the signature of every downloaded component again.

A public key is written `ed25519:<base64 of its 32 bytes>`; a private key file is PKCS#8 PEM (mode 0600).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuron_export.manifest import ComponentRecord

PUBLIC_PREFIX = "ed25519:"
DOMAIN = b"neuron-export remote cache entry 1\n"  # a signature made for anything else never verifies here
MAX_KEY_FILE = 64 * 1024  # a key file is a few hundred bytes: a larger one is not a key


def signed_message(key: str, record: ComponentRecord) -> bytes:
    """The exact bytes signed: the cache key, the component, its inputs and its files, in a canonical order."""
    payload = {
        "cache_key": key,
        "component": record.name,
        "inputs": [[tensor.name, list(tensor.shape), tensor.dtype] for tensor in record.inputs],
        "files": sorted([Path(file.path).name, file.size, file.sha256] for file in record.files),
    }
    return DOMAIN + json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def generate() -> tuple[bytes, str]:
    """A new key pair: the private key as PEM, and the public key's text."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, public_text(private)


def public_text(private: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_PREFIX + base64.b64encode(raw).decode()


def load_private(path: Path) -> Any:
    """The Ed25519 private key in a PEM file; ValueError naming the problem otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = _read_small(path)
    except OSError as error:
        raise ValueError(f"cannot be read ({error.strerror or error})") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError(
            "is not an unencrypted PEM private key (make one with `neuron-export cache keygen FILE`)"
        ) from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ValueError("holds a key that is not Ed25519 (make one with `neuron-export cache keygen FILE`)")
    return private


def parse_public(text: str) -> Any:
    """The Ed25519 public key written as `ed25519:<base64>`; ValueError otherwise."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not text.startswith(PUBLIC_PREFIX):
        raise ValueError(f"does not start with {PUBLIC_PREFIX}")
    try:
        raw = base64.b64decode(text[len(PUBLIC_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not base64 after ed25519:") from None
    if len(raw) != 32:
        raise ValueError("is not 32 bytes long")
    return Ed25519PublicKey.from_public_bytes(raw)


def read_public(value: str) -> str:
    """A trusted key as given: the key itself (`ed25519:...`), or a file holding one (a keygen `.pub` file)."""
    text = value.strip()
    if not text.startswith(PUBLIC_PREFIX):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError("is neither a public key (ed25519:...) nor a file holding one")
        try:
            text = _read_small(path).decode("ascii", "replace").strip()
        except OSError as error:
            raise ValueError(f"cannot be read ({error.strerror or error})") from None
    parse_public(text)
    return text


def sign(private: Any, key: str, record: ComponentRecord) -> str:
    return base64.b64encode(private.sign(signed_message(key, record))).decode()


def verifies(public: str, signature: str, key: str, record: ComponentRecord) -> bool:
    """Whether `public` signed exactly this entry (any malformed input is simply a failed check)."""
    from cryptography.exceptions import InvalidSignature

    try:
        raw = base64.b64decode(signature, validate=True)
        parse_public(public).verify(raw, signed_message(key, record))
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def write_private(path: Path, pem: bytes, replace: bool) -> None:
    """The private key file, created mode 0600 (never readable by others, not even for a moment)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if replace else path
    descriptor = os.open(target, flags, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    if replace:
        os.replace(target, path)


def _read_small(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise ValueError("is too large to be a key file")
    return data
