"""TLS certificates: a real handshake on loopback with the CA, refused without it."""

from __future__ import annotations

import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509

from fedfms_jax.flower.certs import main, make_certificates


def handshake(certs, ca_file, server_hostname="127.0.0.1"):
    """One TLS handshake against a loopback server presenting `certs`' server certificate."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors = []

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError) as error:
            errors.append(error)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(ca_file))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                tls.sendall(b"x")
                return tls.version()
    finally:
        thread.join(timeout=10)
        listener.close()


def test_server_certificate_verifies_against_the_ca(tmp_path):
    certs = make_certificates(tmp_path)
    assert handshake(certs, certs.ca_cert) in ("TLSv1.2", "TLSv1.3")
    assert handshake(certs, certs.ca_cert, server_hostname="localhost")
    cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert stat.S_IMODE(certs.server_key.stat().st_mode) == 0o600
    assert not (tmp_path / "ca.key").exists()


def test_another_ca_or_another_host_is_refused(tmp_path):
    certs = make_certificates(tmp_path / "a")
    other = make_certificates(tmp_path / "b")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        handshake(certs, other.ca_cert)
    only_remote = make_certificates(tmp_path / "c", hosts=["superlink.example.org"])
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
        handshake(only_remote, only_remote.ca_cert)


def test_command_line(tmp_path, capsys):
    main([str(tmp_path), "--host", "10.1.2.3", "--host", "link.example.org", "--keep-ca-key"])
    out = capsys.readouterr().out
    assert "--ssl-certfile" in out and "--root-certificates" in out
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert (tmp_path / "ca.key").exists()
    with pytest.raises(ValueError, match="at least one host"):
        make_certificates(tmp_path / "none", hosts=[])
