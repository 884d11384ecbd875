"""Private keys a local stack makes for itself (FCM service account, APNs token key, VAPID), so
adapters and their sandboxes agree on keys without anyone setting them up. Production configures
real keys through settings and never reaches this module."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def dev_private_key(home: Path, name: str, kind: str = "ec") -> str:
    """PEM of the key `name` under <home>/dev-keys, created once; safe when two processes race."""
    folder = home / "dev-keys"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.pem"
    if path.exists():
        return path.read_text()
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(pem)
    try:
        os.link(tmp, path)  # fails if another process got there first: theirs wins
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_text()


def public_key_pem(private_pem: str) -> str:
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
