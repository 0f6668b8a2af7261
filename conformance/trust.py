"""Signed certificates: ed25519 keys and signatures (through the ``cryptography`` package).

The digest is unkeyed: anyone who edits a certificate can recompute it. A signature binds the
whole certificate (digest included) to the issuer's private key; ``dshal certify --verify
FILE --trust KEY.pub`` checks it against a public key the verifier trusts, obtained out of
band. The signature embeds its public key so that ``--verify`` without ``--trust`` can still
name the signer (by fingerprint), which proves nothing about who that is.

- ``dshal certify --keygen DIR``: ``DIR/dshal-certify.key`` (private, PEM PKCS#8, mode 0600)
  and ``DIR/dshal-certify.pub`` (public, PEM);
- ``dshal certify NAME --sign DIR/dshal-certify.key``: sign every certificate written.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from dshal_conformance.certificate import canonical

ALGORITHM = "ed25519"
KEY_FILE, PUB_FILE = "dshal-certify.key", "dshal-certify.pub"


class TrustError(ValueError):
    """A key that cannot be read or a signature that does not verify (one line)."""


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise TrustError("signing needs the 'cryptography' package: pip install "
                         "'dshal[certify]' (or pip install cryptography)") from None
    return serialization, ed25519


def _raw(public: Any) -> bytes:
    serialization, _ = _crypto()
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(raw_public: bytes) -> str:
    """sha256 of the raw 32-byte public key, hex (how keys are named in messages)."""
    return hashlib.sha256(raw_public).hexdigest()


def keygen(directory: str | Path) -> tuple[Path, Path]:
    """Write a new key pair into ``directory``; refuses to overwrite an existing key."""
    serialization, ed25519 = _crypto()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = d / KEY_FILE, d / PUB_FILE
    if key_path.exists() or pub_path.exists():
        raise TrustError(f"{key_path} or {pub_path} exists already: not overwritten")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def _load(path: str | Path, private: bool) -> Any:
    serialization, ed25519 = _crypto()
    try:
        data = Path(path).read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (OSError, ValueError, TypeError) as exc:
        kind = "private" if private else "public"
        raise TrustError(f"cannot read the {kind} key {path}: {exc}") from None
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, want):
        raise TrustError(f"{path} is not an ed25519 key")
    return key


def _signed_bytes(cert: dict[str, Any]) -> bytes:
    return canonical({k: v for k, v in cert.items() if k != "signature"})


def sign(cert: dict[str, Any], key_path: str | Path) -> dict[str, Any]:
    """``cert`` with a ``signature`` section over everything else (digest included)."""
    key = _load(key_path, private=True)
    raw = _raw(key.public_key())
    value = key.sign(_signed_bytes(cert))
    return {**cert, "signature": {"algorithm": ALGORITHM,
                                  "public_key": base64.b64encode(raw).decode(),
                                  "fingerprint": fingerprint(raw),
                                  "value": base64.b64encode(value).decode()}}


def check(cert: dict[str, Any], trusted: str | Path | None) -> str:
    """Verify the signature (against ``trusted``'s public key when given); returns a line
    describing the signer, raises :class:`TrustError` when it does not verify."""
    sig = cert.get("signature")
    if sig is None:
        if trusted is not None:
            raise TrustError("the certificate is not signed (--trust needs a signature)")
        return "not signed"
    _, ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature

    try:
        if sig["algorithm"] != ALGORITHM:
            raise TrustError(f"unknown signature algorithm {sig['algorithm']!r}")
        raw = base64.b64decode(sig["public_key"], validate=True)
        value = base64.b64decode(sig["value"], validate=True)
        embedded = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise TrustError(f"malformed signature section: {exc}") from None
    if trusted is not None:
        expected = _raw(_load(trusted, private=False))
        if expected != raw:
            raise TrustError(f"signed by key {fingerprint(raw)[:16]}..., not by the trusted key "
                             f"{fingerprint(expected)[:16]}... ({trusted})")
    try:
        embedded.verify(value, _signed_bytes(cert))
    except InvalidSignature:
        raise TrustError("signature does not verify: the certificate was modified after "
                         "signing") from None
    who = f"key {fingerprint(raw)[:16]}..."
    return (f"signed by the trusted {who}" if trusted is not None
            else f"signed by {who} (not checked against a trusted key: use --trust)")
