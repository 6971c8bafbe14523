"""Who the remote cache trusts: the signing key uploads are signed with, the public keys whose entries are used,
and the explicit opt-in to unsigned entries (a private bucket). How to build, not what: in no cache key and
not in the manifest's config. Flags, YAML keys and environment variables are resolved and checked here
(planning/config.py's BuildOptions calls resolve_trust before it checks its fields)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuron_export.planning.config import BuildOptions

SIGNING_KEY_ENV = "NEURON_EXPORT_REMOTE_CACHE_SIGNING_KEY"
TRUSTED_KEYS_ENV = "NEURON_EXPORT_REMOTE_CACHE_TRUSTED_KEYS"  # keys (or .pub files) separated by commas or spaces
KEYGEN_HINT = "make a key pair with `neuron-export cache keygen FILE`"


@dataclass(frozen=True)
class Trust:
    signing_key: Path | None = None  # uploads are signed with it; its public half is trusted too
    trusted: tuple[str, ...] = ()  # public keys (ed25519:...) whose entries are used
    allow_unsigned: bool = False  # a private bucket: unsigned entries are used and uploads may go unsigned

    def private_key(self) -> Any:
        from neuron_export.signing import load_private

        return load_private(self.signing_key) if self.signing_key is not None else None

    def trusted_keys(self) -> frozenset[str]:
        from neuron_export.signing import public_text

        private = self.private_key()
        return frozenset(self.trusted) | ({public_text(private)} if private is not None else set())

    @property
    def can_upload(self) -> bool:
        return self.signing_key is not None or self.allow_unsigned


def resolve_trust(signing_key: Path | str | None, trusted: tuple[str, ...] | list[str], allow_unsigned: bool) -> Trust:
    """The settings as given, else from the environment; each key checked (ValueError: one sentence)."""
    from neuron_export.signing import load_private

    where = "--remote-cache-signing-key"
    if not signing_key and os.environ.get(SIGNING_KEY_ENV):
        signing_key, where = os.environ[SIGNING_KEY_ENV], SIGNING_KEY_ENV
    path = Path(signing_key).expanduser() if signing_key else None
    if path is not None:
        try:
            load_private(path)
        except ValueError as problem:
            raise ValueError(f"{where} {str(path)!r} {problem}; {KEYGEN_HINT}") from None
    return Trust(path, resolve_trusted(trusted), bool(allow_unsigned))


def resolve_trusted(trusted: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Trusted public keys as given (keys or .pub files), else from the environment; ValueError naming a bad one."""
    from neuron_export.signing import read_public

    given, where = list(trusted), "--remote-cache-trusted-key"
    if not given and os.environ.get(TRUSTED_KEYS_ENV):
        given, where = [v for v in re.split(r"[,\s]+", os.environ[TRUSTED_KEYS_ENV]) if v], TRUSTED_KEYS_ENV
    keys = []
    for value in given:
        try:
            keys.append(read_public(value))
        except ValueError as problem:
            raise ValueError(
                f"{where} {value!r} {problem}; pass the public key `cache keygen` printed, or its .pub file"
            ) from None
    return tuple(dict.fromkeys(keys))


def trust_of(options: BuildOptions) -> Trust:
    return Trust(
        options.remote_cache_signing_key, tuple(options.remote_cache_trusted_keys), options.remote_cache_allow_unsigned
    )
