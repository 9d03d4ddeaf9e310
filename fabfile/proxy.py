"""The reverse proxy: temporary certificates, and nginx reloads that never leave
a rejected config in place."""

from __future__ import annotations

import datetime
import shlex

from .shell import program
from .layout import Layout
from .render import PROXY_PROJECT

BACKUP = ".sfab-old"


def placeholder_cert(names: list[str]) -> tuple[bytes, bytes]:
    """A short-lived self-signed certificate so nginx can start (and answer ACME
    HTTP-01 challenges) before the real certificate exists."""
    # imported here: a deploy that needs no certificate does not pay for x509
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def certificates_program(lay: Layout) -> str:
    """The host-side program that renews, issues and installs certificates under one
    lock (templates/reverse_proxy/bin/renew-certificates.j2)."""
    return shlex.quote(lay.bin("renew-certificates"))


def issue_script(lay: Layout, sn: str, names: list[str], acme) -> str:
    """Ask the ACME CA for one certificate covering `names` (HTTP-01 through the
    webroot nginx serves), once: a failure stops with the CA's own error and is
    never retried in a loop. On success the certificate replaces the temporary one."""
    args = [sn, acme.directory_url, acme.email or "", *names]
    return f"{certificates_program(lay)} --issue {' '.join(shlex.quote(a) for a in args)}"


def install_cert_script(lay: Layout, sn: str) -> str:
    """Copy certbot's current certificate to where nginx reads it (atomically)."""
    return f"{certificates_program(lay)} --install {shlex.quote(sn)}"


def reload_script(changed_confs: list[str]) -> str:
    """Test the new config in the running nginx; reload if accepted, otherwise put
    the previous files back (so the old config keeps serving) and fail with
    nginx's own error (fabfile/scripts/nginx-reload.sh)."""
    return program("nginx-reload.sh", confs=" ".join(changed_confs), backup=BACKUP, project=PROXY_PROJECT)
