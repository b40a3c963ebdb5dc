"""Certificates and SuperNode authentication keys for a deployment.

``make_certs(out, server_names=..., hosts=...)`` writes::

    <out>/ca.crt                    CA certificate: to the server and every data host
    <out>/ca.key                    CA private key (0600): keep it offline
    <out>/superlink.crt             SuperLink TLS certificate; SANs = server names + IPs
    <out>/superlink.key             its private key (0600): server only
    <out>/hosts/<name>/auth.key     the host's SuperNode key, OpenSSH EC P-384 (0600)
    <out>/hosts/<name>/auth.pub     its public key: the server registers it

Flower 1.42 wants SuperNode keys as OpenSSH-encoded NIST EC keys
(``flower-supernode --auth-supernode-private-key``, ``flwr supernode register``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

__all__ = ["CertSet", "host_key_pair", "make_certs"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class CertSet:
    """Paths of everything ``make_certs`` wrote."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    host_keys: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def summary(self) -> str:
        hosts = ", ".join(self.host_keys) or "none"
        return (
            f"certs in {self.root}: server gets ca.crt superlink.crt superlink.key; "
            f"each host <name> ({hosts}) gets ca.crt hosts/<name>/auth.key; "
            f"the server registers hosts/*/auth.pub; keep ca.key offline"
        )


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)  # umask may have narrowed or O_CREAT kept an old mode
    os.replace(tmp, path)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def host_key_pair(key_path: Path, pub_path: Path) -> None:
    """A SuperNode authentication key pair (OpenSSH, EC P-384)."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _write(
        pub_path,
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n",
        0o644,
    )


def make_certs(
    out: str | Path,
    *,
    server_names: list[str],
    hosts: list[str],
    days: int = 365,
    force: bool = False,
) -> CertSet:
    """Create a CA, the SuperLink certificate and one key pair per data host.

    An existing CA is reused (so hosts can be added later) unless ``force``; host
    keys that exist are kept, so re-running never locks out a registered host.
    """
    root = Path(out)
    if not server_names:
        raise ConfigError("server names must not be empty; pass --server-name NAME")
    for name in hosts:
        if not _NAME.match(name):
            raise ConfigError(
                f"host name {name!r} is invalid; use letters, digits, '.', '_' or '-'"
            )
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"host names must be unique, got {hosts}")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    now = dt.datetime.now(dt.UTC)
    ca_cert_path, ca_key_path = root / "ca.crt", root / "ca.key"

    if ca_key_path.exists() and ca_cert_path.exists() and not force:
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedstream CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            )
            .sign(ca_key, hashes.SHA384())
        )
        _write(
            ca_key_path,
            ca_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            0o600,
        )
        _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)

    # The SuperLink certificate is always renewed: its SANs follow the arguments.
    names = list(dict.fromkeys([*server_names, "localhost", "127.0.0.1", "::1"]))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])])
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA384())
    )
    server_cert, server_key = root / "superlink.crt", root / "superlink.key"
    _write(
        server_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    # Chain: leaf then CA, so a client that only trusts the CA can verify.
    _write(
        server_cert,
        cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM),
        0o644,
    )

    host_keys: dict[str, tuple[Path, Path]] = {}
    for name in hosts:
        kp, pp = root / "hosts" / name / "auth.key", root / "hosts" / name / "auth.pub"
        if force or not (kp.exists() and pp.exists()):
            host_key_pair(kp, pp)
        os.chmod(kp.parent, 0o700)
        host_keys[name] = (kp, pp)
    return CertSet(root, ca_cert_path, ca_key_path, server_cert, server_key, host_keys)
