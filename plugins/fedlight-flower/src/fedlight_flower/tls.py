"""TLS certificates and SuperNode authentication keys for a Flower deployment, made with ``cryptography``.

``fedlight flower deploy`` (and ``local``) write, under ``<app>/tls/``:

* ``ca.crt``: a fresh self-signed CA (EC P-384). Its private key is never written: nobody, the
  operator included, can later mint another certificate this deployment trusts; re-run ``deploy``
  for a new host list.
* ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by that CA, with a SAN for every
  address SuperNodes and ``flwr`` use (the ``--superlink`` host, plus ``127.0.0.1`` and ``localhost``,
  which the SuperLink's own ServerApp processes use to reach it).
* ``supernode-K.key`` / ``supernode-K.pub``: one EC P-384 key pair per SuperNode (OpenSSH format, as
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read them in flwr
  1.42); with ``flower-superlink --enable-supernode-auth`` only registered keys may connect.

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: always in the SuperLink's SAN: its ServerApp/SuperExec children connect to 127.0.0.1 when it binds 0.0.0.0
LOCAL_NAMES = ("127.0.0.1", "localhost")
CURVE = ec.SECP384R1  # what Flower recommends for SuperNode keys; fine for TLS too


@dataclass(frozen=True)
class TlsFiles:
    """Paths of one deployment's TLS material (all absolute)."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private, OpenSSH; public next to it with suffix .pub

    def node_public_key(self, k: int) -> Path:
        return self.node_keys[k].with_suffix(".pub")


def _files(directory: Path, num_nodes: int) -> TlsFiles:
    return TlsFiles(
        directory,
        directory / "ca.crt",
        directory / "server.pem",
        directory / "server.key",
        tuple(directory / f"supernode-{k}.key" for k in range(num_nodes)),
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def san_names(hosts: Iterable[str]) -> list[str]:
    """The SAN entries for ``hosts``: each once, in order, with 127.0.0.1 and localhost; bind-all addresses dropped."""
    names: list[str] = []
    for host in [*hosts, *LOCAL_NAMES]:
        host = host.strip().strip("[]")
        if host and host not in ("0.0.0.0", "::") and host not in names:
            names.append(host)
    return names


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode under O_CREAT


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlight"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_tls(directory: str | Path, hosts: Sequence[str], num_nodes: int, days: int = 365) -> TlsFiles:
    """Write a CA, a SuperLink certificate for ``hosts`` and ``num_nodes`` SuperNode key pairs to ``directory``."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    files = _files(directory, num_nodes)
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(CURVE())
    ca_name = _name("fedlight deployment CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    names = san_names(hosts)
    server_key = ec.generate_private_key(CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_private(
        files.server_key,
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    for path in files.node_keys:
        key = ec.generate_private_key(CURVE())
        _write_private(path, key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        path.with_suffix(".pub").write_bytes(public + b"\n")
    return files


def existing_tls(directory: str | Path, hosts: Sequence[str], num_nodes: int) -> TlsFiles | None:
    """The TLS files already in ``directory`` when they cover ``hosts`` and ``num_nodes`` and are valid now; else None.

    Re-running ``deploy`` keeps a running deployment's certificates and keys instead of silently replacing them.
    """
    files = _files(Path(directory).resolve(), num_nodes)
    paths = [files.ca_cert, files.server_cert, files.server_key, *files.node_keys]
    if not all(p.is_file() for p in paths) or not all(files.node_public_key(k).is_file() for k in range(num_nodes)):
        return None
    try:
        cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:  # noqa: BLE001 (an unreadable, foreign or tampered file: make new ones)
        return None
    have = {str(v) for v in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))
    now = _dt.datetime.now(_dt.timezone.utc)
    if not set(san_names(hosts)) <= have or not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return None
    return files


def ensure_tls(directory: str | Path, hosts: Sequence[str], num_nodes: int) -> TlsFiles:
    """:func:`existing_tls` when it fits, otherwise :func:`make_tls`."""
    return existing_tls(directory, hosts, num_nodes) or make_tls(directory, hosts, num_nodes)
