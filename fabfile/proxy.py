"""The reverse proxy: temporary certificates, and nginx reloads that never leave
a rejected config in place."""

from __future__ import annotations

import datetime
import shlex

from .docker import container
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
    nginx's own error."""
    restore = "\n".join(
        f"  if [ -e {shlex.quote(p + BACKUP)} ]; then mv -f {shlex.quote(p + BACKUP)} {shlex.quote(p)};"
        f" else rm -f {shlex.quote(p)}; fi"
        for p in changed_confs
    )
    cleanup = " ".join(shlex.quote(p + BACKUP) for p in changed_confs) or "/dev/null/none"
    return f"""
c={container(PROXY_PROJECT, 'nginx')}
if [ -z "$c" ]; then echo "nginx is not running" >&2; exit 1; fi
if ! out=$(docker exec "$c" nginx -t 2>&1); then
{restore}
  echo "nginx rejected the new configuration; the previous one is still serving:" >&2
  echo "$out" | grep -v 'test failed' >&2
  exit 1
fi
rm -f {cleanup}
docker exec "$c" sh -c {shlex.quote(_RELOAD_AND_WAIT)}
"""


# `nginx -s reload` only signals the master, which starts new workers (new config)
# and only THEN tells the old ones to stop accepting: until an old worker has
# renamed itself "worker process is shutting down" (or exited) it may still take
# a new connection with the old config. "Deployed" means every new connection
# gets the new config, so wait for both: a new worker, and no old one accepting.
_RELOAD_AND_WAIT = r"""
workers() { for p in /proc/[0-9]*; do tr '\0' ' ' < $p/cmdline 2>/dev/null | grep -q 'worker process *$' && echo ${p#/proc/}; done; }
old=$(workers | sort)
nginx -s reload
i=0
while [ $i -lt 200 ]; do
  now=$(workers | sort)
  if echo "$now" | grep -vxF "$old" | grep -q . && ! echo "$now" | grep -xF "$old" | grep -q .; then exit 0; fi
  sleep 0.05; i=$((i+1))
done
echo "nginx did not move every worker to the new configuration within 10s" >&2
exit 1
"""
