"""Credentials made for one deployment run: a TLS certificate authority and the SuperLink's certificate, and one EC
key pair per SuperNode for Flower's SuperNode authentication. Generated with `cryptography` (Flower's own
dependency), written owner-readable only, never reused across runs.

TLS: the SuperLink serves with `--ssl-certfile/--ssl-keyfile` (a certificate for 127.0.0.1 and localhost signed by the
run's CA, `--ssl-ca-certfile`); SuperNodes and the `flwr` CLI verify it with `--root-certificates` / the connection's
`root-certificates`. Authentication: the SuperLink runs with `--enable-supernode-auth`; each node's public key (SSH
format, NIST P-384) is registered with `flwr supernode register` before the node starts with
`--auth-supernode-private-key`, and requests signed by any other key are refused.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Certificates:
    ca: Path  # the run's CA certificate: what clients verify the SuperLink with
    cert: Path  # the SuperLink's certificate
    key: Path  # the SuperLink's private key


def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(directory: Path, days: int = 2) -> Certificates:
    """A CA and a server certificate for 127.0.0.1 / localhost, valid for `days`."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("slimtune run CA")).issuer_name(_name("slimtune run CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server_cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days)).add_extension(names, critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path = directory / "ca.crt", directory / "server.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_path = _write_private(directory / "server.key", server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return Certificates(ca_path, cert_path, key_path)


def make_node_key(directory: Path, name: str) -> tuple[Path, Path]:
    """(private key, public key) of one SuperNode, in the OpenSSH formats Flower reads (P-384)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = _write_private(directory / name, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = directory / f"{name}.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public
