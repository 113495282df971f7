"""`fl-lab deploy certs`: a local CA, the SuperLink's certificate and the SuperNodes' key pairs.

The `cryptography` package comes with flwr. The CA signs the SuperLink's certificate (SAN localhost,
127.0.0.1 and `superlink` for compose); each SuperNode gets its own P-384 key pair in OpenSSH
format, the form `flower-supernode --auth-supernode-private-key` and `flwr supernode register` read.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lab.artifacts import atomic_write_bytes


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_certificates(folder: Path, hosts: Iterable[str] = ("localhost", "127.0.0.1", "superlink"),
                      days: int = 365) -> Certificates:
    """A local CA and a SuperLink server certificate signed by it (P-384 ECDSA keys).

    Args:
        folder: where ca.crt, ca.key, server.crt, server.key go (keys are 0600 from their creation).
        hosts: DNS names / IP addresses for the server certificate's subjectAltName.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FL Security Lab local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
              .issuer_name(ca_name).public_key(key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    plain = serialization.NoEncryption()
    out = Certificates(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    atomic_write_bytes(out.ca_cert, ca.public_bytes(pem))
    _write_secret(folder / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    atomic_write_bytes(out.server_cert, server.public_bytes(pem))
    _write_secret(out.server_key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, plain))
    return out


def make_node_key(private_path: Path) -> Path:
    """A SuperNode auth key pair in OpenSSH format (P-384): `private_path` and `<private_path>.pub`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    _write_secret(private_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
    public = private_path.with_name(private_path.name + ".pub")
    atomic_write_bytes(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b"\n")
    return public


def _write_secret(path: Path, data: bytes) -> None:
    """A private key, 0600 from the creation of its temporary file (never a moment readable by others)."""
    atomic_write_bytes(path, data, private=True)


def make_secrets(folder: Path, nodes: int, hosts: Iterable[str] = ("localhost", "127.0.0.1", "superlink")
                 ) -> tuple[Certificates, list[Path]]:
    """`fl-lab deploy certs`: certificates in folder/certs, node keys folder/keys/node-<i>(.pub)."""
    certs = make_certificates(folder / "certs", hosts)
    keys = [folder / "keys" / f"node-{i}" for i in range(nodes)]
    for k in keys:
        make_node_key(k)
    return certs, keys
