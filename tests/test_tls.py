"""Self-signed TLS material for the SuperLink (the deployment test runs a federation over it)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedmosaic_cli.tls import write_certificates


def test_server_certificate_is_signed_by_the_ca_and_names_every_host(tmp_path: Path) -> None:
    files = write_certificates(tmp_path, ["10.1.2.3", "superlink.example.org"], days=30)
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_certificate.read_bytes())
    assert server.issuer == ca.subject
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes,  # type: ignore[union-attr,call-arg]
                           ec.ECDSA(server.signature_hash_algorithm))  # type: ignore[arg-type]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (files.server_key, tmp_path / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert files.superlink_args()[1::2] == [str(files.ca_certificate), str(files.server_certificate),
                                            str(files.server_key)]


def test_bad_arguments_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one host"):
        write_certificates(tmp_path, [" "])
    with pytest.raises(ValueError, match="days must be positive, got 0"):
        write_certificates(tmp_path, ["127.0.0.1"], days=0)
    assert not list(tmp_path.iterdir())  # nothing written
