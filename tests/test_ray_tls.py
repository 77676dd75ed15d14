"""Certificates for Ray's mutual TLS: signed by the CA, valid for both ends, naming the node."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from helios.ray_tls import make_certificates, tls_env


def test_node_certificate_is_signed_by_the_ca_for_server_and_client(tmp_path: Path) -> None:
    paths = make_certificates(tmp_path, names=["localhost", "head.svc"], ips=["127.0.0.1", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "head.svc"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.7"]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert (paths["key"].stat().st_mode & 0o777) == 0o600 and ((tmp_path / "ca.key").stat().st_mode & 0o777) == 0o600
    # openssl agrees, as Ray's gRPC will
    ok = subprocess.run(["openssl", "verify", "-CAfile", str(paths["ca"]), str(paths["cert"])], capture_output=True,
                        text=True, check=False)
    assert ok.returncode == 0 and "OK" in ok.stdout


def test_a_second_node_keeps_the_ca(tmp_path: Path) -> None:
    first = make_certificates(tmp_path, names=["a"], ips=["127.0.0.1"])
    ca = first["ca"].read_bytes()
    make_certificates(tmp_path, names=["b"], ips=["127.0.0.1"])
    assert first["ca"].read_bytes() == ca
    env = tls_env(tmp_path)
    assert env["RAY_USE_TLS"] == "1" and env["RAY_TLS_CA_CERT"] == str(tmp_path / "ca.crt")


def test_cli_tls_init_writes_the_files(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "helios.cli", "tls", "init", str(tmp_path / "certs")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == ["ca.crt", "ca.key", "tls.crt", "tls.key"]
    assert "RAY_USE_TLS=1" in out.stdout + out.stderr
