"""TLS contexts and certificates: TLS 1.3 by default, certificates made with ``cryptography``."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Dict, Iterable, Optional, Union

__all__ = ["server_context", "client_context", "generate_certs", "CertificatesExist"]

PathLike = Union[str, "os.PathLike[str]"]


def _check_file(path: Optional[PathLike], what: str) -> None:
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {os.fspath(path)}")


def server_context(certfile: PathLike, keyfile: PathLike, cafile: Optional[PathLike] = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """A server context, TLS 1.3 minimum. With ``require_client_cert`` (needs ``cafile``), clients
    must present a certificate signed by that CA (mutual TLS)."""
    _check_file(certfile, "certificate")
    _check_file(keyfile, "key")
    _check_file(cafile, "CA")
    if require_client_cert and cafile is None:
        raise ValueError("require_client_cert needs cafile: the CA that signs client certificates")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(certfile, keyfile)
    if cafile is not None:
        ctx.load_verify_locations(cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(cafile: Optional[PathLike] = None, skip_verify: bool = False,
                   certfile: Optional[PathLike] = None, keyfile: Optional[PathLike] = None) -> ssl.SSLContext:
    """A client context, TLS 1.3 minimum, verifying the server against ``cafile`` (or the system
    trust store without one). ``skip_verify`` turns verification off and must be asked for."""
    _check_file(cafile, "CA")
    _check_file(certfile, "certificate")
    _check_file(keyfile, "key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif cafile is not None:
        ctx.load_verify_locations(cafile)
    else:
        ctx.load_default_certs()
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


class CertificatesExist(FileExistsError):
    """``generate_certs(force=False)`` would overwrite these files (``paths``)."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = sorted(paths)
        super().__init__(", ".join(str(p) for p in self.paths))


def generate_certs(directory: PathLike, names: Iterable[str] = ("localhost",), ips: Iterable[str] = ("127.0.0.1",),
                   client: bool = False, days: int = 825, *, domain: Optional[str] = None,
                   pairs: Optional[Iterable[str]] = None, reuse_ca: bool = False, force: bool = True) -> Dict[str, Path]:
    """Write a CA (``ca.pem``, ``ca.key``) and a server certificate signed by it (``server.pem``,
    ``server.key``; and ``client.pem``, ``client.key`` with ``client=True``; ``wildcard.pem``,
    ``wildcard.key`` for ``*.DOMAIN`` and ``DOMAIN`` with ``domain``), valid for Python's ``ssl``
    and rustls. Keys are readable by the owner only. A negative ``days`` makes leaves that are
    already expired (for tests). Returns the paths written, by name.

    ``pairs`` names the leaf pairs to write (default: server, plus client and wildcard as asked);
    with ``reuse_ca`` a CA already in the directory signs them (else a new CA is made); with
    ``force=False`` nothing is written if any file would be overwritten (``CertificatesExist``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    wanted = set(pairs) if pairs is not None else {"server"} | ({"client"} if client else set()) | (
        {"wildcard"} if domain else set())
    if "wildcard" in wanted and not domain:
        raise ValueError("a wildcard certificate needs a domain")
    have_ca = reuse_ca and (out / "ca.pem").is_file() and (out / "ca.key").is_file()
    targets = [out / f"{n}.{ext}" for n in sorted(wanted) for ext in ("pem", "key")]
    if not have_ca:
        targets += [out / "ca.pem", out / "ca.key"]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise CertificatesExist(existing)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    names = list(names)
    ip_addrs = [ipaddress.ip_address(i) for i in ips]
    if not names and not ip_addrs:
        raise ValueError("the server certificate needs at least one name or IP address")

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(path: Path, k: ec.EllipticCurvePrivateKey) -> None:
        data = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)

    if have_ca:
        try:
            ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
            loaded = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
        except ValueError as exc:
            raise ValueError(f"the CA in {out} cannot be read ({exc}); move it away or pass --force") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"the CA key in {out} is not an EC key made by ferrotunnel certs")
        ca_key, ca_name = loaded, ca.subject
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    else:
        ca_key = key()
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferrotunnel CA")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False, decipher_only=False),
                             critical=True)
              .add_extension(ca_ski, critical=False)
              .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, sans: list, usage: x509.ObjectIdentifier) -> tuple:
        k = key()
        if days >= 0:
            nb, na = now - datetime.timedelta(days=1), now + datetime.timedelta(days=days)
        else:
            nb, na = now - datetime.timedelta(days=2 - days), now + datetime.timedelta(days=days)
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(ca_name).public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(nb).not_valid_after(na)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()), k

    paths: Dict[str, Path] = {}

    def save(name: str, cert: x509.Certificate, k: Optional[ec.EllipticCurvePrivateKey]) -> None:
        p = out / f"{name}.pem"
        p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}.pem"] = p
        if k is not None:
            write_key(out / f"{name}.key", k)
            paths[f"{name}.key"] = out / f"{name}.key"

    if not have_ca:
        save("ca", ca, ca_key)
    if "server" in wanted:
        sans: list = [x509.DNSName(n) for n in names]
        sans += [x509.IPAddress(i) for i in ip_addrs]
        cert, k = leaf(names[0] if names else str(ip_addrs[0]), sans, ExtendedKeyUsageOID.SERVER_AUTH)
        save("server", cert, k)
    if "client" in wanted:
        cert, k = leaf("ferrotunnel client", [], ExtendedKeyUsageOID.CLIENT_AUTH)
        save("client", cert, k)
    if "wildcard" in wanted:
        assert domain is not None
        d = domain.strip().lower().rstrip(".")
        cert, k = leaf(f"*.{d}", [x509.DNSName(f"*.{d}"), x509.DNSName(d)], ExtendedKeyUsageOID.SERVER_AUTH)
        save("wildcard", cert, k)
    return paths
