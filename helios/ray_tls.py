"""Ray's own mutual TLS for a Helios cluster: certificates, and the environment that turns it on.

Ray encrypts and authenticates its gRPC channels (GCS, raylets, workers, object transfers)
when every process starts with `RAY_USE_TLS=1` and the same CA; each process presents a
certificate the CA signed, so a process without one cannot join the cluster. Ray uses
one certificate for both ends of a channel, so it must be valid for server and client
authentication and name every address the node is reached at.

`helios tls init DIR` writes a CA and a node certificate; `helios serve` with
`HELIOS_TLS=1` makes them (under the cache root, once) and starts its Ray head with TLS.
On Kubernetes, issue each pod its certificate at start from a CA kept in a Secret (the
SANs must cover the pod IP and the head service's DNS name).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from pathlib import Path

CA_CERT, CA_KEY, NODE_CERT, NODE_KEY = "ca.crt", "ca.key", "tls.crt", "tls.key"


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def node_names() -> tuple[list[str], list[str]]:
    """DNS names and IPs this node is reached at: localhost, its hostname, loopback, its address."""
    from helios.ray_env import node_address

    names = sorted({"localhost", socket.gethostname(), socket.getfqdn()})
    return names, sorted({"127.0.0.1", node_address()})


def make_certificates(directory: Path, names: list[str] | None = None, ips: list[str] | None = None,
                      days: int = 365) -> dict[str, Path]:
    """A CA (kept if one is there) and a node certificate it signs, for server and client auth."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    default_names, default_ips = node_names()
    names, ips = names or default_names, ips or default_ips
    now = datetime.datetime.now(datetime.UTC)
    ca_cert_path, ca_key_path = directory / CA_CERT, directory / CA_KEY
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    else:
        ca_key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "helios-ray-ca")])
        ca_cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days * 5))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        _write_key(ca_key_path, ca_key)
        ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    key = _key()
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_key(directory / NODE_KEY, key)
    (directory / NODE_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return {"ca": ca_cert_path, "cert": directory / NODE_CERT, "key": directory / NODE_KEY}


def tls_env(directory: Path) -> dict[str, str]:
    """The variables every Ray process of a TLS cluster starts with (its head, workers, drivers)."""
    return {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(directory / NODE_CERT),
            "RAY_TLS_SERVER_KEY": str(directory / NODE_KEY), "RAY_TLS_CA_CERT": str(directory / CA_CERT)}


def tls_enabled() -> bool:
    return os.environ.get("HELIOS_TLS", "").lower() in ("1", "true", "yes")
