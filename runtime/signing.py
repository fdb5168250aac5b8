"""Signed bundles: an Ed25519 signature over manifest.json, kept beside it in manifest.sig.

The manifest holds the sha256 of every file the runtime opens, so signing the manifest's
exact bytes covers the whole bundle: labels, paths, preprocessing and, through the hashes,
every graph. The crypto is the `cryptography` library's Ed25519 (extra `sign`), imported
only when keys are made, a bundle is signed or a signature is checked.

manifest.sig is JSON: {"algorithm": "ed25519", "key_id", "signatures": {sha256(manifest
bytes): base64 signature}}. Keyed by the manifest's hash so that an export can add the new
manifest's signature before it replaces the manifest and drop the old one after: at every
instant the signature file holds a signature for the manifest on disk (no window in which a
killed export leaves a signed bundle looking unsigned). Only signatures by a trusted key
count; the key id (sha256 of the raw public key, 16 hex digits) is only for messages.

    write_keypair("keys/huse")                       # keys/huse.key (private, 0600) + keys/huse.pub
    sign_manifest(bundle, "keys/huse.key")           # what `huse-export --sign` does
    verify_signature(bundle, manifest_bytes, ["keys/huse.pub"])   # what the runtime does
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from huse.runtime._lazy import lazy_import
from huse.runtime.errors import HuseError
from huse.runtime.files import MANIFEST, write_atomic, write_json_atomic

__all__ = ["SIGNATURE", "write_keypair", "sign_manifest", "verify_signature", "key_id", "add_signature",
           "drop_signatures_except", "check_signing_key", "write_signed_manifest"]

SIGNATURE = "manifest.sig"
ALGORITHM = "ed25519"
EXTRA = "sign"


def _crypto():
    lazy_import("cryptography", EXTRA)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return serialization, ed25519


def _raw_public(public_key) -> bytes:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    """Short fingerprint of an Ed25519 public key (for messages, never for trust decisions)."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def write_keypair(stem: str | Path, force: bool = False) -> tuple[Path, Path]:
    """Create an Ed25519 keypair: STEM.key (PKCS#8 PEM, mode 0600) and STEM.pub (SubjectPublicKeyInfo PEM).

    Args:
        stem: path without suffix, e.g. "keys/huse" (a missing folder is created, mode 0700).
        force: replace existing files.
    Returns:
        (private key path, public key path).
    """
    serialization, ed25519 = _crypto()
    stem = Path(stem)
    priv_path, pub_path = stem.with_name(stem.name + ".key"), stem.with_name(stem.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not force:
            raise HuseError(f"{p} exists; pass --force to replace the keypair (bundles signed with it stop verifying)")
    if priv_path.parent.exists() and not priv_path.parent.is_dir():
        raise HuseError(f"{priv_path.parent} is not a folder; name a folder for the keypair")
    priv_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new folder for a private key: the owner's only
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    if force:
        priv_path.unlink(missing_ok=True)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def _load_private(path: str | Path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise HuseError(f"signing key {path} does not exist; create one with `huse keygen KEYSTEM`") from None
    except (ValueError, TypeError) as e:
        raise HuseError(f"signing key {path} is not an unencrypted PEM private key ({e}); "
                        "create one with `huse keygen KEYSTEM`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise HuseError(f"signing key {path} is a {type(key).__name__}, not Ed25519; create one with `huse keygen KEYSTEM`")
    return key


def check_signing_key(path: str | Path) -> str:
    """Load a private signing key (to fail early on a bad one); returns its key id."""
    return key_id(_load_private(path).public_key())


def _load_public(path: str | Path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise HuseError(f"trusted key {path} does not exist") from None
    except (ValueError, TypeError) as e:
        raise HuseError(f"trusted key {path} is not a PEM public key ({e}); pass the .pub file from `huse keygen`") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise HuseError(f"trusted key {path} is a {type(key).__name__}, not Ed25519")
    return key


def _read_sig(folder: Path, name: str = SIGNATURE) -> dict:
    path = folder / name
    try:
        sig = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as e:
        raise HuseError(f"{folder}: {name} is not valid JSON ({e}); re-sign the bundle") from None
    if not isinstance(sig, dict) or sig.get("algorithm") != ALGORITHM or not isinstance(sig.get("signatures"), dict):
        raise HuseError(f"{folder}: {name} is not an {ALGORITHM} signature file; re-sign it")
    return sig


def _write_sig(folder: Path, sig: dict) -> None:
    write_json_atomic(folder / SIGNATURE, sig)


def add_signature(folder: str | Path, manifest_bytes: bytes, private_key: str | Path) -> str:
    """Add a signature of `manifest_bytes` to FOLDER/manifest.sig (keeping the others); returns the key id."""
    key = _load_private(private_key)
    folder = Path(folder)
    sig = _read_sig(folder) or {"algorithm": ALGORITHM, "signatures": {}}
    kid = key_id(key.public_key())
    if sig.get("key_id") != kid:  # one signer per file: another key's signatures are not kept
        sig = {"algorithm": ALGORITHM, "signatures": {}}
    sig["key_id"] = kid
    sig["signatures"][hashlib.sha256(manifest_bytes).hexdigest()] = base64.b64encode(key.sign(manifest_bytes)).decode()
    _write_sig(folder, sig)
    return kid


def drop_signatures_except(folder: str | Path, manifest_bytes: bytes) -> None:
    """Keep only the signature of `manifest_bytes` (after the manifest it signs has replaced the old one)."""
    folder = Path(folder)
    sig = _read_sig(folder)
    if not sig:
        return
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if digest in sig["signatures"]:
        sig["signatures"] = {digest: sig["signatures"][digest]}
        _write_sig(folder, sig)
    else:  # signed the old manifest only: a stale signature would only ever be a "bad signature"
        (folder / SIGNATURE).unlink(missing_ok=True)


def write_signed_manifest(folder: str | Path, data: bytes, sign_key: str | Path | None = None) -> None:
    """Replace FOLDER/manifest.json with `data`, keeping manifest.sig true to it (bundles and indexes).

    With `sign_key` the new bytes are signed before they replace the manifest and the old
    signature is dropped after, so a kill at any instant leaves a manifest that verifies.
    Without it a signature of the old manifest is dropped: a stale signature would only ever
    be a "bad signature", and an artifact changed by someone without the key is unsigned.
    """
    folder = Path(folder)
    if sign_key is not None:
        add_signature(folder, data, sign_key)
    write_atomic(folder / MANIFEST, data)
    if sign_key is not None or (folder / SIGNATURE).exists():
        drop_signatures_except(folder, data)


def sign_manifest(folder: str | Path, private_key: str | Path) -> str:
    """Sign FOLDER/manifest.json as it is on disk; returns the key id."""
    folder = Path(folder)
    data = (folder / MANIFEST).read_bytes()
    kid = add_signature(folder, data, private_key)
    drop_signatures_except(folder, data)
    return kid


def verify_signature(folder: str | Path, manifest_bytes: bytes, trusted_keys: Sequence[str | Path] | None,
                     what: str = "manifest.json", sig_name: str = SIGNATURE,
                     sign_hint: str = "huse-export BUNDLE --sign KEY") -> str | None:
    """Check that `manifest_bytes` carry a valid signature by one of `trusted_keys`.

    The one place signatures are checked: bundles (runtime/bundle.py) and retrieval indexes
    call it with the exact bytes they parsed.

    Args:
        folder: the artifact directory holding `sig_name`.
        manifest_bytes: the bytes of the manifest as read (verify what you parse, not a re-read).
        trusted_keys: PEM public key files; None or empty: no check (unsigned artifacts load).
        what: the signed file's name, for messages.
        sig_name: the detached signature file in `folder`.
        sign_hint: the command that signs this kind of artifact, for the "not signed" message.
    Returns:
        The key id that verified, or None when no keys were given.
    Raises:
        HuseError: unsigned, signed by an untrusted key, or changed after signing; each named.
    """
    if not trusted_keys:
        return None
    folder = Path(folder)
    keys = [_load_public(k) for k in _as_list(trusted_keys)]
    from cryptography.exceptions import InvalidSignature

    path = folder / sig_name
    if not path.is_file():
        raise HuseError(f"{folder}: {what} is not signed ({sig_name} is missing) and trusted keys are configured; "
                        f"refusing it. Sign it with `{sign_hint}`")
    sig = _read_sig(folder, sig_name)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    trusted_ids = {key_id(k): k for k in keys}
    signer = sig.get("key_id")
    if signer not in trusted_ids:
        raise HuseError(f"{folder}: {what} is signed by key {signer}, which is not among the trusted keys "
                        f"({', '.join(sorted(trusted_ids))}); refusing it")
    b64 = sig["signatures"].get(digest)
    if b64 is None:
        raise HuseError(f"{folder}: bad signature: {what} was changed after it was signed (its sha256 {digest[:16]}... "
                        f"has no signature in {sig_name}); refusing it. Re-export or re-sign it")
    try:
        trusted_ids[signer].verify(base64.b64decode(b64, validate=True), manifest_bytes)
    except (InvalidSignature, ValueError):
        raise HuseError(f"{folder}: bad signature: the signature of {what} in {sig_name} does not verify with "
                        f"trusted key {signer}; refusing it") from None
    return signer


def describe_signature(folder: str | Path, manifest_bytes: bytes, verified: bool = False,
                       sig_name: str = SIGNATURE) -> str:
    """What `sig_name` in `folder` says about `manifest_bytes`, for people; `verified`: `verify_signature`
    passed (only a trusted key checks a signature)."""
    sig = _read_sig(Path(folder), sig_name)
    if not sig:
        return "unsigned"
    if hashlib.sha256(manifest_bytes).hexdigest() not in sig["signatures"]:
        return f"{sig_name} holds no signature of this manifest (changed after signing by key {sig.get('key_id')})"
    return f"signed by key {sig.get('key_id')}, " + ("verified with a trusted key" if verified else
                                                    "not checked (pass --trusted-key PUB to check it)")


def _as_list(keys: Iterable[str | Path] | str | Path) -> list:
    return [keys] if isinstance(keys, (str, Path)) else list(keys)
