"""A TLS server for tests: certificates made on the spot (``cryptography`` if installed, else the
``openssl`` command), and a server binary built with TLS (``$ACTORS_TLS_SERVER_BIN``, the one the
runtime would use, or ``redis-server`` / ``valkey-server`` on PATH). Tests skip, saying why,
when there is neither."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import redis

from actors.errors import ServerError
from actors.server import find_binary

BIN_ENV = "ACTORS_TLS_SERVER_BIN"


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class TlsServer:
    port: int
    certs: Certificates
    binary: str

    def url(self, *, client_cert: bool = True, user: str = "") -> str:
        """A ``rediss://`` URL that trusts the test CA and, by default, shows the client's cert."""
        options = {"ssl_ca_certs": str(self.certs.ca)}
        if client_cert:
            options |= {
                "ssl_certfile": str(self.certs.client_cert),
                "ssl_keyfile": str(self.certs.client_key),
            }
        return f"rediss://{user}127.0.0.1:{self.port}/0?{urlencode(options)}"


class Unavailable(Exception):
    """No way to make certificates, or no server binary with TLS: the reason to skip."""


def make_certificates(directory: Path) -> Certificates:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    certs = Certificates(*(directory / name for name in (
        "ca.crt", "server.crt", "server.key", "client.crt", "client.key")))  # fmt: skip
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            raise Unavailable("neither the cryptography package nor the openssl command is here") from None
        _with_openssl(directory, certs)
    else:
        _with_cryptography(certs)
    return certs


def _with_openssl(directory: Path, certs: Certificates) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    ca_key = directory / "ca.key"
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(certs.ca),
        "-days", "2", "-subj", "/CN=actors test CA")  # fmt: skip
    for cert, key, name, extensions in (
        (certs.server_cert, certs.server_key, "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        (certs.client_cert, certs.client_key, "actors-client", "extendedKeyUsage=clientAuth"),
    ):
        request, ext = directory / f"{name}.csr", directory / f"{name}.ext"
        ext.write_text(extensions + "\n")
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(request),
            "-subj",
            f"/CN={name}",
        )
        run("x509", "-req", "-in", str(request), "-CA", str(certs.ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip


def _with_cryptography(certs: Certificates) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))  # fmt: skip

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("actors test CA")).issuer_name(name("actors test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    certs.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_names = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    )
    client_usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    for cert_path, key_path, common, extension in (
        (certs.server_cert, certs.server_key, "localhost", server_names),
        (certs.client_cert, certs.client_key, "actors-client", client_usage),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(common)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(extension, critical=False).sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, key_path)


def candidate_binaries() -> list[str]:
    found = [os.environ.get(BIN_ENV, "")]
    with contextlib.suppress(ServerError):
        found.append(find_binary())
    found += [shutil.which(name) or "" for name in ("redis-server", "valkey-server")]
    return list(dict.fromkeys(b for b in found if b))


@contextlib.contextmanager
def tls_server(directory: Path) -> Iterator[TlsServer]:
    """The first candidate binary that serves TLS, on a loopback port with no plain TCP port
    and client certificates required; stopped at the end."""
    certs = make_certificates(directory / "certs")
    tried: list[str] = []
    for binary in candidate_binaries():
        port = _free_port()
        data = directory / f"data-{len(tried)}"
        data.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
             "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "yes",
             "--save", "", "--appendonly", "no", "--dir", str(data), "--logfile", "server.log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=data,
        )  # fmt: skip
        server = TlsServer(port, certs, binary)
        if _ready(server, proc):
            try:
                yield server
            finally:
                proc.terminate()
                proc.wait(30)
            return
        proc.kill()
        proc.wait(30)
        log = data / "server.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        why = next((line for line in lines if "TLS" in line), "")
        tried.append(f"{binary}: {why.split('#')[-1].strip() or 'did not start with --tls-port'}")
    raise Unavailable(
        "no server binary with TLS support (tried: " + ("; ".join(tried) or "none found") + f"); install "
        f"one built with TLS (Debian's or Ubuntu's redis-server) or name it in ${BIN_ENV}"
    )


def _ready(server: TlsServer, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with redis.Redis.from_url(server.url(), socket_connect_timeout=1) as client:
                if client.ping():
                    return True
        except (redis.ConnectionError, OSError):
            time.sleep(0.05)
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
