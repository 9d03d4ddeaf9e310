"""Local stand-in images for the sandbox (see tests/sandbox/README.md).

No registry is reachable, so every image is built here: Debian bases made with
debootstrap (trixie for the stand-ins and the Debian 13 host, bookworm for the
Debian 12 host and PostgreSQL 15), then one folder per image under
tests/sandbox/images/.  Each image carries the label ``synapse-fabric.inputs-hash``;
a build is skipped when an image with the tag and that label already exists.

    python -m tests.sandbox.images [build|list] [NAME...]
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGES_DIR = HERE / "images"
REPO = HERE.parent.parent
CACHE = REPO / ".cache"
LABEL = "synapse-fabric.inputs-hash"

DEBOOTSTRAP = ["debootstrap", "--variant=minbase", "{suite}", "{rootfs}",
               "http://deb.debian.org/debian"]
IMPORT_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["bash"]',
]
# Wheels are downloaded on the machine (PyPI is unreachable from inside containers)
# for the image's Python on x86_64: (CPython version, newest glibc of the suite).
PYTHONS = {"bookworm": ("3.11", 36), "trixie": ("3.13", 41)}


def wheel_platform_args(suite: str) -> list[str]:
    py, glibc = PYTHONS[suite]
    abi = "cp" + py.replace(".", "")
    return (["--only-binary=:all:", "--python-version", py, "--implementation", "cp",
             "--abi", abi, "--abi", "abi3", "--abi", "none"]
            + [a for v in range(glibc, 4, -1) for a in ("--platform", f"manylinux_2_{v}_x86_64")]
            + ["--platform", "manylinux2014_x86_64", "--platform", "manylinux2010_x86_64",
               "--platform", "manylinux1_x86_64", "--platform", "linux_x86_64"])


@dataclass
class Spec:
    name: str
    tag: str                      # may contain {hash12}
    base: str | None = "base13"   # name of the spec whose tag is passed as BASE
    wheels: list[str] = field(default_factory=list)  # requirements to pip download
    args: dict[str, str] = field(default_factory=dict)  # extra --build-arg
    dir: str = ""                 # folder under images/ (default: the name)
    suite: str = ""               # a debootstrap base: the Debian suite

    @property
    def folder(self) -> Path:
        return IMAGES_DIR / (self.dir or self.name)

    @property
    def debian(self) -> str:
        """The Debian suite the image is built on."""
        return self.suite or _spec(self.base).debian


# The registry. Other modules may append: SPECS["x"] = Spec("x", "some/tag:{hash12}").
# Stand-ins carry the REAL references the product's defaults name (fabfile/schema.py);
# each keeps its upstream image's contract (tests/sandbox/README.md), not its version.
SPECS: dict[str, Spec] = {s.name: s for s in [
    Spec("base", "synapse-fabric/debian:bookworm-{hash12}", base=None, suite="bookworm"),
    Spec("base13", "synapse-fabric/debian:trixie-{hash12}", base=None, dir="base", suite="trixie"),
    # with the `redis` extra, as upstream's image (its workers replicate through Redis)
    Spec("synapse", "matrixdotorg/synapse:v1.163.2",
         wheels=["matrix-synapse[redis]==1.163.2", "psycopg2-binary==2.9.13"]),
    # the release before: what `inv upgrade` starts from (tests/e2e/test_upgrade.py)
    Spec("synapse-prev", "matrixdotorg/synapse:v1.162.0", dir="synapse",
         wheels=["matrix-synapse==1.162.0", "psycopg2-binary==2.9.13"]),
    # a new version that fails half-way through its migrations (tests only)
    Spec("synapse-broken", "synapse-fabric/synapse-broken:{hash12}", base="synapse"),
    Spec("postgres", "postgres:17-trixie", args={"PG_MAJOR": "17"}),
    # what homeservers created before the default moved to 17 keep running
    Spec("postgres15", "postgres:15-bookworm", base="base", dir="postgres", args={"PG_MAJOR": "15"}),
    Spec("nginx", "nginx:1.30"),
    Spec("certbot", "certbot/certbot:v5.8.0", wheels=["certbot==5.8.0"]),
    Spec("admin-ui", "ghcr.io/etkecc/ketesa:v1.0.0", base="nginx"),
    Spec("coturn", "coturn/coturn:4.7.0"),
    Spec("valkey", "valkey/valkey:9.1.1-alpine"),
    Spec("host", "synapse-fabric/sandbox-host:{hash12}", base="base"),
    Spec("host13", "synapse-fabric/sandbox-host13:{hash12}"),
    Spec("infra", "synapse-fabric/sandbox-infra:{hash12}", base="base"),
    Spec("store", "synapse-fabric/sandbox-store:{hash12}"),
]}


def _spec(name: str) -> Spec:
    if name not in SPECS:
        raise KeyError(f"unknown image {name!r}; known: {', '.join(SPECS)}")
    return SPECS[name]


def _hash_folder(h, folder: Path) -> None:
    files = [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for p in sorted(files, key=lambda p: p.relative_to(folder).as_posix()):
        data = p.read_bytes()
        rel = p.relative_to(folder).as_posix()
        h.update(f"{rel}\0{os.access(p, os.X_OK):d}\0{len(data)}\0".encode())
        h.update(data)


def _wheel_dir(spec: Spec) -> Path:
    return CACHE / "wheels" / spec.name / spec.debian


def wheels(name: str, log=print) -> str:
    """Download the spec's wheel set (once) and return its pinned requirement list."""
    spec = _spec(name)
    wdir = _wheel_dir(spec)
    platform_args = wheel_platform_args(spec.debian)
    request = json.dumps([spec.wheels, platform_args])
    lock, req = wdir / "requirements.txt", wdir / "request.json"
    if lock.is_file() and req.is_file() and req.read_text() == request:
        return lock.read_text()
    t0 = time.monotonic()
    log(f"images: downloading wheels for {name} into {wdir}")
    shutil.rmtree(wdir, ignore_errors=True)
    wdir.mkdir(parents=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
          "-d", str(wdir), *platform_args, *spec.wheels])
    pins = set()
    for whl in wdir.glob("*.whl"):
        dist, version = whl.name.split("-")[:2]
        pins.add(f"{dist.replace('_', '-').lower()}=={version}")
    text = "".join(f"{p}\n" for p in sorted(pins))
    lock.write_text(text)
    req.write_text(request)
    log(f"images: {len(pins)} wheels for {name} in {time.monotonic() - t0:.1f}s")
    return text


def inputs_hash(name: str) -> str:
    spec = _spec(name)
    h = hashlib.sha256()
    if spec.base is None:  # a debootstrap base
        h.update(json.dumps([DEBOOTSTRAP, IMPORT_CHANGES, spec.suite]).encode())
    else:
        h.update(f"base\0{inputs_hash(spec.base)}\0".encode())
    if spec.args:
        h.update(b"args\0" + json.dumps(spec.args, sort_keys=True).encode())
    _hash_folder(h, spec.folder)
    if spec.wheels:
        h.update(b"wheels\0" + wheels(name).encode())
    return h.hexdigest()


def tag_of(name: str) -> str:
    spec = _spec(name)
    if "{hash12}" not in spec.tag:
        return spec.tag
    return spec.tag.format(hash12=inputs_hash(name)[:12])


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    if res.returncode != 0:
        tail = "\n".join(res.stdout.decode(errors="replace").splitlines()[-60:])
        raise RuntimeError(f"command failed ({res.returncode}): {argv[:4]}...\n{tail}")
    return res


def _label_of(tag: str) -> str | None:
    res = subprocess.run(["docker", "image", "inspect", "--format",
                          "{{json .Config.Labels}}", tag], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return (json.loads(res.stdout) or {}).get(LABEL)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [ln.split()[1] for ln in f if ln.split()[1].startswith(str(path))]


def _build_base(spec: Spec, tag: str, digest: str) -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    rootfs = tmp / "rootfs"
    try:
        _run([a.format(rootfs=rootfs, suite=spec.suite) for a in DEBOOTSTRAP])
        overlay = spec.folder / "rootfs"  # optional files laid over the rootfs
        if overlay.is_dir():
            shutil.copytree(overlay, rootfs, dirs_exist_ok=True, symlinks=True)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        changes = [a for c in IMPORT_CHANGES + [f"LABEL {LABEL}={digest}"] for a in ("-c", c)]
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
                               stdout=subprocess.PIPE)
        try:
            _run(["docker", "import", *changes, "-", tag], stdin=tar.stdout)
        finally:
            tar.stdout.close()
            if tar.wait() != 0:
                raise RuntimeError("tar of the debootstrap rootfs failed")
    finally:
        mounts = _mounts_under(tmp)
        if mounts:  # never rmtree through a leftover /proc or /sys mount
            print(f"images: NOT removing {tmp}: still mounted: {mounts}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _build_context(spec: Spec) -> Path:
    if not spec.wheels:
        return spec.folder
    ctx = CACHE / "build" / spec.name
    shutil.rmtree(ctx, ignore_errors=True)
    shutil.copytree(spec.folder, ctx, symlinks=True)
    (ctx / "wheels").mkdir()
    for f in _wheel_dir(spec).iterdir():
        try:
            os.link(f, ctx / "wheels" / f.name)
        except OSError:
            shutil.copy2(f, ctx / "wheels" / f.name)
    return ctx


def _ensure_one(name: str, done: dict[str, str], log) -> str | None:
    if name in done:
        return done[name]
    spec = _spec(name)
    if spec.base is not None and not (spec.folder / "Dockerfile").is_file():
        log(f"images: SKIP {name}: {spec.folder} has no Dockerfile yet")
        return None
    base_tag = None
    if spec.base is not None:
        base_tag = _ensure_one(spec.base, done, log)
        if base_tag is None:
            log(f"images: SKIP {name}: its base {spec.base} is unavailable")
            return None
    if spec.wheels:
        wheels(name, log)
    t0 = time.monotonic()
    digest = inputs_hash(name)
    tag = tag_of(name)
    if _label_of(tag) == digest:
        log(f"images: {name:<8} {tag} cached ({time.monotonic() - t0:.1f}s)")
    else:
        log(f"images: {name:<8} {tag} building...")
        if spec.base is None:
            _build_base(spec, tag, digest)
        else:
            ctx = _build_context(spec)
            try:
                args = [a for k, v in sorted(spec.args.items()) for a in ("--build-arg", f"{k}={v}")]
                _run(["docker", "build", "-t", tag, "--label", f"{LABEL}={digest}",
                      "--build-arg", f"BASE={base_tag}", *args, "-f", str(ctx / "Dockerfile"),
                      str(ctx)])
            finally:
                if ctx != spec.folder:
                    shutil.rmtree(ctx, ignore_errors=True)
        log(f"images: {name:<8} {tag} built in {time.monotonic() - t0:.1f}s")
    done[name] = tag
    return tag


def ensure(names=None, log=print) -> dict[str, str]:
    """Build the named images (default: all whose folder exists) unless cached.

    Returns {name: tag} for every image that is now available (bases included)."""
    names = list(names) if names else [n for n, s in SPECS.items() if s.base is not None]
    done: dict[str, str] = {}
    t0 = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "images.lock", "w") as lock:  # one builder at a time per machine
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("images: waiting for another process building images...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        for name in names:
            _ensure_one(name, done, log)
    log(f"images: ready in {time.monotonic() - t0:.1f}s: {', '.join(done) or 'nothing'}")
    return done


def main(argv: list[str]) -> int:
    cmd, names = (argv[0], argv[1:]) if argv else ("build", [])
    if cmd == "build":
        ensure(names or None)
    elif cmd == "list":
        for name in names or SPECS:
            spec = _spec(name)
            if spec.base is not None and not (spec.folder / "Dockerfile").is_file():
                print(f"{name:<8} (no folder yet)")
                continue
            tag = tag_of(name)
            state = "cached" if _label_of(tag) == inputs_hash(name) else "missing"
            print(f"{name:<8} {tag:<45} {state}")
    else:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
