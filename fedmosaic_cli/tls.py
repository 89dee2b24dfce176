"""Self-signed TLS material for a SuperLink (a CA and a server certificate signed by it) and the
SuperNodes' authentication keys.

``fedmosaic certificates --out DIR --host superlink.example.org --host 10.0.0.5`` writes
``ca.crt`` (give it to every SuperNode as ``--root-certificates`` and to the ``flwr`` CLI as the
connection's ``root-certificates``), ``server.pem`` and ``server.key`` (the SuperLink's
``--ssl-certfile`` / ``--ssl-keyfile``; ``--ssl-ca-certfile ca.crt``). The server certificate
names every ``--host`` as a subject alternative name (IP addresses as IP entries), which is
what TLS clients check. Keys are EC P-256; the private keys are written with mode 0600.
For production, certificates from your organisation's CA are the better choice.

``--supernode NAME`` (repeatable) also writes ``keys/NAME`` and ``keys/NAME.pub``: an EC P-384 key
pair in OpenSSH format, what Flower's SuperNode authentication takes. Register each public key
(``fedmosaic register-supernodes`` or ``flwr supernode register keys/NAME.pub <connection>``)
and start that SuperNode with ``--auth-supernode-private-key keys/NAME``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmosaic_core.storage import atomic_write_bytes


@dataclass(frozen=True)
class TlsFiles:
    ca_certificate: Path
    server_certificate: Path
    server_key: Path

    def superlink_args(self) -> list[str]:
        return [
            "--ssl-ca-certfile", str(self.ca_certificate),
            "--ssl-certfile", str(self.server_certificate),
            "--ssl-keyfile", str(self.server_key),
        ]

    def client_args(self) -> list[str]:
        return ["--root-certificates", str(self.ca_certificate)]


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedMosaic federation"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_certificates(out_dir: str | os.PathLike[str], hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                       days: int = 365) -> TlsFiles:
    """A fresh CA and a server certificate for ``hosts``, written into ``out_dir``."""
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise ValueError("write_certificates: give at least one host name or IP address")
    if days <= 0:
        raise ValueError(f"write_certificates: days must be positive, got {days}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("FedMosaic federation CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_name)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    private = serialization.PrivateFormat.PKCS8
    files = TlsFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    atomic_write_bytes(out / "ca.key", ca_key.private_bytes(pem, private, serialization.NoEncryption()), 0o600)
    atomic_write_bytes(files.ca_certificate, ca_cert.public_bytes(pem), 0o644)
    atomic_write_bytes(files.server_key, server_key.private_bytes(pem, private, serialization.NoEncryption()), 0o600)
    atomic_write_bytes(files.server_certificate, server_cert.public_bytes(pem), 0o644)
    return files


@dataclass(frozen=True)
class SupernodeKey:
    """One SuperNode's authentication key pair (OpenSSH EC P-384)."""

    name: str
    private_key: Path
    public_key: Path

    def supernode_args(self) -> list[str]:
        return ["--auth-supernode-private-key", str(self.private_key)]


def write_supernode_keys(out_dir: str | os.PathLike[str], names: Sequence[str]) -> list[SupernodeKey]:
    """A fresh key pair per SuperNode name in ``out_dir`` (``NAME`` mode 0600, ``NAME.pub``)."""
    out = Path(out_dir)
    bad = [n for n in names if not n or "/" in n or n.startswith(".") or n != n.strip()]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"write_supernode_keys: SuperNode names must be distinct plain file names, got {list(names)!r}")
    out.mkdir(parents=True, exist_ok=True)
    keys = []
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        pair = SupernodeKey(name, out / name, out / f"{name}.pub")
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        atomic_write_bytes(pair.private_key, private, 0o600)
        atomic_write_bytes(pair.public_key, public + b"\n", 0o644)
        keys.append(pair)
    return keys


def write_superexec_secret(path: str | os.PathLike[str]) -> Path:
    """A random shared secret (mode 0600) for ``--superexec-auth-secret-file``: the SuperLink and
    SuperNodes then serve their Runtime API only to SuperExecs that hold it."""
    import secrets

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, secrets.token_hex(32).encode(), 0o600)
    return target
