"""TLS certificates for a SuperLink: a private certificate authority and a server
certificate it signs, valid for the SuperLink's host names and addresses.

    python -m fedfms_jax.flower.certs OUT_DIR [--host superlink.example.org --host 10.0.0.5]

writes OUT_DIR/ca.crt (give it to every site), OUT_DIR/server.pem and OUT_DIR/server.key (keep
them on the SuperLink's machine; the key is written readable by its owner only) and leaves
OUT_DIR/ca.key out unless --keep-ca-key. The flags that use them:

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
    flower-supernode --root-certificates ca.crt --superlink HOST:PORT ...
    flwr config (~/.flwr/config.toml):  root-certificates = "ca.crt"  (and no insecure = true)

The defaults cover a SuperLink on this machine (127.0.0.1, ::1 and localhost).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclasses.dataclass(frozen=True)
class Certificates:
    """Paths of the files `make_certificates` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def superlink_args(self) -> list[str]:
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile",
                str(self.server_cert), "--ssl-keyfile", str(self.server_key)]

    def supernode_args(self) -> list[str]:
        return ["--root-certificates", str(self.ca_cert)]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfms_jax"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_certificates(out_dir: str | os.PathLike, hosts: Sequence[str] = LOOPBACK_HOSTS,
                      days: int = 365, keep_ca_key: bool = False) -> Certificates:
    """Writes ca.crt, server.pem and server.key (and ca.key if keep_ca_key) into out_dir.

    hosts: the names and IP addresses the sites use to reach the SuperLink; each becomes a
    subject alternative name of the server certificate (TLS checks the address against them).
    """
    if not hosts:
        raise ValueError("at least one host name or address is needed for the certificate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    # A minute of slack: certificates are checked on other machines, whose clocks differ.
    not_before, not_after = now - datetime.timedelta(minutes=1), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fedfms_jax federation CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    paths = Certificates(out / "ca.crt", out / "server.pem", out / "server.key")
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths.server_key, key_pem(server_key), private=True)
    if keep_ca_key:
        _write(out / "ca.key", key_pem(ca_key), private=True)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--host", action="append", dest="hosts",
                        help="a name or address the sites use for the SuperLink (repeatable; "
                             f"default: {', '.join(LOOPBACK_HOSTS)})")
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--keep-ca-key", action="store_true",
                        help="also write ca.key, to sign more certificates later")
    args = parser.parse_args(argv)
    paths = make_certificates(args.out_dir, args.hosts or LOOPBACK_HOSTS, args.days,
                              args.keep_ca_key)
    print(f"wrote {paths.ca_cert}, {paths.server_cert}, {paths.server_key}\n"
          f"SuperLink: flower-superlink {' '.join(paths.superlink_args())} ...\n"
          f"each site: flower-supernode {' '.join(paths.supernode_args())} ...")


if __name__ == "__main__":
    main()
