"""The image as it ships: built by `make image` on a base made from Debian packages, run by podman
the way Kubernetes runs it (read-only root filesystem, /tmp on tmpfs, no capabilities, no new
privileges, the config and a Secret-shaped folder of key material mounted read-only), on the
host's network with every listener and peer on 127.0.0.1.

The base image (mmdebstrap, one to two minutes) is made once per machine; `make image` reuses
podman's layer cache, so a run with an unchanged lock rebuilds only the project's own layer."""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import itertools
import json
import os
import re
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import pytest
from cryptography import x509

from tests.harness import (
    PEERS,
    Nginx,
    Peer,
    curl,
    free_port,
    mtls_server,
    need,
    origin_pki,
    wait_port,
)
from tests.pkifactory import Issued

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
BASE_IMAGE = "localhost/mtls-sidecar-base:bookworm"
IMAGE = "localhost/mtls-sidecar:test"
# crun fails on this host's hybrid cgroup hierarchy; runc does not.
PODMAN = ("podman", "--runtime", "runc")
UID = 65532
# The Debian packages the base needs, without docs, man pages and translations, and with
# merged /usr made by mmdebstrap's hook instead of the usrmerge package (which pulls in perl).
MMDEBSTRAP = (
    "mmdebstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
    "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
    "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-include=/usr/share/locale/locale.alias",
    "bookworm",
)  # fmt: skip
_names = itertools.count()


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def ulimits() -> list[str]:
    """Explicit limits at or below this process's own: podman's defaults may exceed them."""

    def below(kind: int, cap: int) -> int:
        soft = resource.getrlimit(kind)[0]
        return cap if soft == resource.RLIM_INFINITY else min(soft, cap)

    nofile, nproc = below(resource.RLIMIT_NOFILE, 65536), below(resource.RLIMIT_NPROC, 4096)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def sandbox() -> list[str]:
    """What the Kubernetes manifests ask for, in podman's words; never a registry pull."""
    return [
        "--pull=never", "--network=host", "--read-only", "--read-only-tmpfs=false",
        "--tmpfs", "/tmp:rw,nosuid,nodev,size=16m,mode=1777", "--cap-drop=ALL",
        "--security-opt=no-new-privileges", *ulimits(),
    ]  # fmt: skip


IMAGE_TOOLS = ("podman", "runc", "mmdebstrap")


def need_image_tools() -> None:
    """Skip (fail under CI) with one reason naming every missing tool. mmdebstrap is needed
    only while the base image is not built yet."""
    missing = [t for t in ("podman", "runc", "make") if shutil.which(t) is None]
    if "podman" not in missing and shutil.which("mmdebstrap") is None:
        if podman("image", "exists", BASE_IMAGE).returncode != 0:
            missing.append("mmdebstrap")
    elif "podman" in missing and shutil.which("mmdebstrap") is None:
        missing.append("mmdebstrap")
    if missing:
        reason = (
            f"the image tests need {', '.join(IMAGE_TOOLS)} (mmdebstrap builds the base image"
            f" once); missing: {', '.join(missing)}"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (installed by .ci/run)")
        pytest.skip(reason)


def make_base(workdir: Path) -> None:
    if podman("image", "exists", BASE_IMAGE).returncode == 0:
        return
    need("mmdebstrap")
    tarball = workdir / "base.tar"
    out = subprocess.run(
        [*MMDEBSTRAP, str(tarball)], capture_output=True, text=True, timeout=900, check=False
    )
    assert out.returncode == 0, f"mmdebstrap failed:\n{out.stderr[-3000:]}"
    imported = podman("import", str(tarball), BASE_IMAGE, timeout=300)
    tarball.unlink()
    assert imported.returncode == 0, imported.stderr


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`make image` once per test run, whichever xdist worker gets here first; one build at a
    time in this tree, whatever runs it (they share build/wheelhouse)."""
    need_image_tools()
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this run's folder, common to its workers
    built = shared / "image.built"
    (ROOT / "build").mkdir(exist_ok=True)
    with (ROOT / "build" / "image.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            make_base(shared)
            stamp = VENV / ".installed-stamp"
            out = subprocess.run(
                ["make", "-o", str(stamp), "image", f"VENV={VENV}", f"BASE={BASE_IMAGE}",
                 f"PODMAN={' '.join(PODMAN)}", f"IMAGE={IMAGE}"],
                cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
            )  # fmt: skip
            assert out.returncode == 0, f"make image failed:\n{(out.stdout + out.stderr)[-5000:]}"
            built.write_text(IMAGE)
    return IMAGE


@attrs.define
class Container:
    """One `podman run`, attached, so that its exit status is the sidecar's."""

    image: str
    args: Sequence[str]
    log_path: Path
    name: str = attrs.Factory(lambda: f"mtls-sidecar-test-{os.getpid()}-{next(_names)}")
    proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: Sequence[int] = ()) -> Container:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*PODMAN, "run", "--rm", "--name", self.name, *sandbox(), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            for port in wait:
                wait_port("127.0.0.1", port, self.proc, timeout=60)
        except Exception:
            self.remove()
            raise RuntimeError(f"container did not start:\n{self.log()}") from None
        return self

    def signal(self, name: str) -> None:
        podman("kill", "--signal", name, self.name)

    def exec(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *argv)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def remove(self) -> int | None:
        """Stop the container as Kubernetes would (SIGTERM, then a kill after a grace period);
        its process is always reaped. Returns the sidecar's exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal("TERM")
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                podman("rm", "--force", "--time", "0", "--ignore", self.name)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def running(container: Container, wait: Sequence[int] = ()) -> Iterator[Container]:
    container.start(wait)
    try:
        yield container
    finally:
        container.remove()


def write_secret(folder: Path, files: dict[str, bytes]) -> Path:
    """FILES written into FOLDER as the kubelet writes a Secret volume, first or as an update:
    the data in a new timestamped folder, `..data` swapped to it in one rename, each name a
    symlink through `..data`, the previous data folder removed. defaultMode 0400 with the pod's
    fsGroup ends as 0440 root:fsGroup (the kubelet adds group read, kubernetes#57923)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    old = (folder / "..data").resolve() if (folder / "..data").exists() else None
    data = folder / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    data.mkdir(mode=0o755)
    for name, content in files.items():
        path = data / name
        path.write_bytes(content)
        if os.geteuid() == 0:
            os.chown(path, 0, UID)
            path.chmod(0o440)
        else:  # no chown without root: readable to the container's user some other way
            path.chmod(0o444)
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(Path("..data") / name)
    (folder / "..data_tmp").symlink_to(data.name)
    os.replace(folder / "..data_tmp", folder / "..data")
    if old is not None:
        shutil.rmtree(old)
    return folder


def served_serial(env: Env, port: int) -> int:
    """The serial number of the certificate the ingress serves to a partner."""
    ctx = ssl.create_default_context(cafile=str(env.dir / "server-ca.pem"))
    ctx.load_cert_chain(str(env.dir / "client.pem"), str(env.dir / "client.key"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@attrs.frozen
class Env:
    dir: Path
    server_ca: Issued
    nginx_port: int
    upstream: Peer
    record: Path

    def secret(self, folder: Path, server: Issued | None = None) -> Path:
        """The key material both routes need, as a Secret volume in FOLDER."""
        d = self.dir
        files = {
            name: (d / source).read_bytes()
            for name, source in {
                "client.pem": "client.pem", "client.key": "client.key",
                "server.pem": "origin.pem", "server.key": "origin.key",
                "server-ca.pem": "server-ca.pem", "client-ca.pem": "client-ca.pem",
            }.items()
        }  # fmt: skip
        if server is not None:
            files["server.pem"], files["server.key"] = server.chain_pem(), server.key_pem()
        return write_secret(folder, files)

    def config(self, name: str, origin_port: int, extra: str = "") -> tuple[Path, dict[str, int]]:
        """A config as the ConfigMap holds it: key material under tls/, beside the config."""
        ports = {"egress": free_port(), "ingress": free_port(), "admin": free_port()}
        path = self.dir / f"{name}.toml"
        path.write_text(
            textwrap.dedent(
                f"""
                [log]
                format = "json"
                [service]
                drain_timeout = 10
                {extra}
                [admin]
                listen = "127.0.0.1:{ports["admin"]}"
                [[egress]]
                name = "out"
                listen = "127.0.0.1:{ports["egress"]}"
                upstream = "https://localhost:{origin_port}"
                client_cert = "tls/client.pem"
                client_key = "tls/client.key"
                trust = "tls/server-ca.pem"
                response_timeout = 10
                [[ingress]]
                name = "in"
                listen = "127.0.0.1:{ports["ingress"]}"
                server_cert = "tls/server.pem"
                server_key = "tls/server.key"
                client_ca = "tls/client-ca.pem"
                upstream = "http://127.0.0.1:{self.upstream.port}"
                """
            )
        )
        path.chmod(0o644)
        return path, ports

    def sidecar(self, image: str, config: Path, secret: Path | None = None) -> Container:
        secret = secret or self.secret(config.parent / f"{config.stem}-secret")
        return Container(
            image,
            ["--volume", f"{config}:/etc/mtls-sidecar/config.toml:ro",
             "--volume", f"{secret}:/etc/mtls-sidecar/tls:ro",
             image, "run", "-c", "/etc/mtls-sidecar/config.toml"],
            config.with_suffix(".log"),
        )  # fmt: skip

    def partner(self, port: int, path: str = "/notify") -> list[str]:
        """curl arguments for the partner calling the ingress with its client certificate."""
        d = self.dir
        return [
            "--cacert", str(d / "server-ca.pem"), "--cert", str(d / "client.pem"),
            "--key", str(d / "client.key"), f"https://localhost:{port}{path}",
        ]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("image")
    server_ca, _ = origin_pki(d)
    record = d / "upstream.jsonl"
    upstream = Peer([str(PEERS / "recording_upstream.py"), "--record", str(record)]).start()
    port = free_port()
    nginx = Nginx(
        d / "nginx",
        mtls_server(
            f"127.0.0.1:{port}", d / "origin.pem", d / "origin.key", d / "client-ca.pem",
            'location / { return 200 "origin saw $ssl_client_s_dn at $request_uri\\n"; }',
        ),
    )  # fmt: skip
    try:
        nginx.start([("127.0.0.1", port)])
        yield Env(d, server_ca, port, upstream, record)
    finally:
        nginx.stop()
        upstream.stop()


def test_missing_image_tools_skip_with_a_reason_naming_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception) as skipped:
        need_image_tools()
    assert str(skipped.value.msg).startswith(
        "the image tests need podman, runc, mmdebstrap (mmdebstrap builds the base image once);"
        " missing: podman, runc, make, mmdebstrap"
    )


def test_the_lock_pins_every_runtime_dependency_within_pyproject() -> None:
    """The image installs requirements.lock alone: a dependency it misses breaks the image."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name, _, version = line.split(" ")[0].partition("==")
            pins[canonicalize_name(name)] = version
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for text in declared:
        wanted = Requirement(text)
        name = canonicalize_name(wanted.name)
        assert name in pins, f"{wanted.name} is not in requirements.lock: run `make lock`"
        assert wanted.specifier.contains(pins[name]), f"{text} vs {pins[name]}: run `make lock`"
    assert "--hash=sha256:" in (ROOT / "requirements.lock").read_text()


def test_demo_runs_in_the_image(image: str) -> None:
    out = subprocess.run(
        [*PODMAN, "run", "--rm", *sandbox(), image, "demo"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "forbidden_host" in out.stdout
    assert "X-Client-Subject:" in out.stdout


def test_egress_and_ingress_round_trip_with_secret_mounted_key_material(
    image: str, env: Env
) -> None:
    config, ports = env.config("roundtrip", env.nginx_port)
    with running(env.sidecar(image, config), ports.values()) as sidecar:
        egress = curl(f"http://127.0.0.1:{ports['egress']}/pay/1")
        ingress = curl(*env.partner(ports["ingress"], "/notify/1"), "--data", '{"ok":1}')
        ready = curl(f"http://127.0.0.1:{ports['admin']}/readyz")
        healthy = curl(f"http://127.0.0.1:{ports['admin']}/healthz")
        status = sidecar.remove()  # access lines are flushed at exit at the latest
    log = sidecar.log()
    assert status == 0, log
    assert egress.status == 200, log
    assert egress.body.decode().startswith("origin saw "), egress.body
    assert "MGW0000001" in egress.body.decode() and "/pay/1" in egress.body.decode()
    assert ingress.status == 200, log
    seen = json.loads(ingress.body)
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["path"] == "/notify/1" and seen["body_len"] == 8
    assert headers["x-client-verify"] == "SUCCESS"
    assert "MGW0000001" in headers["x-client-subject"]
    assert (ready.status, healthy.status) == (200, 200)
    access = [json.loads(x) for x in log.splitlines() if '"access"' in x]
    assert {(a["route"], a["status"]) for a in access} >= {("out", 200), ("in", 200)}


def test_sigterm_drains_requests_in_flight_and_exits_0(
    image: str, env: Env, tmp_path: Path
) -> None:
    slow = Peer(
        [str(PEERS / "tls_origin.py"), "--mode", "slow", "--delay", "2",
         "--cert", str(env.dir / "origin.pem"), "--key", str(env.dir / "origin.key"),
         "--client-ca", str(env.dir / "client-ca.pem"), "--record", str(tmp_path / "rec")]
    ).start()  # fmt: skip
    config, ports = env.config("drain", slow.port)
    container = env.sidecar(image, config)
    try:
        with (
            running(container, ports.values()),
            concurrent.futures.ThreadPoolExecutor(4) as pool,
        ):
            calls = [
                pool.submit(curl, f"http://127.0.0.1:{ports['egress']}/pay/{i}") for i in range(4)
            ]
            record, deadline = tmp_path / "rec", time.monotonic() + 10
            while not record.exists() or len(record.read_bytes().splitlines()) < 4:
                assert time.monotonic() < deadline, container.log()  # all four at the origin
                time.sleep(0.05)
            container.signal("TERM")
            results = [c.result() for c in calls]
            status = container.wait(20)
    finally:
        slow.stop()
    log = container.log()
    assert [r.status for r in results] == [200] * 4, log
    assert all(r.body == b"slow" for r in results)
    assert status == 0, log


def test_a_secret_update_reaches_the_sidecar_through_its_file_watch(image: str, env: Env) -> None:
    config, ports = env.config("rotate", env.nginx_port, "reload_interval = 1")
    secret = env.secret(env.dir / "rotate-secret")
    with running(env.sidecar(image, config, secret), ports.values()) as sidecar:
        before = served_serial(env, ports["ingress"])
        renewed = env.server_ca.issue(
            "CN=localhost", dns=("localhost",), ips=("127.0.0.1",), server=True
        )
        env.secret(secret, server=renewed)  # the kubelet's update of the mounted Secret
        deadline = time.monotonic() + 15
        while (serial := served_serial(env, ports["ingress"])) == before:
            assert time.monotonic() < deadline, sidecar.log()
            time.sleep(0.2)
        still = curl(*env.partner(ports["ingress"], "/after-rotation"))
    assert serial == renewed.cert.serial_number
    assert still.status == 200, sidecar.log()


def test_sidecar_is_pid_1_not_root_and_writes_only_to_tmp(image: str, env: Env) -> None:
    config, ports = env.config("sandbox", env.nginx_port)
    probe = textwrap.dedent(
        """
        import json, os
        status = dict(l.split(":", 1) for l in open("/proc/1/status").read().splitlines())
        cmdline = open("/proc/1/cmdline", "rb").read().split(b"\\0")
        writable = {}
        for folder in ["/", "/etc", "/etc/mtls-sidecar", "/etc/mtls-sidecar/tls", "/opt",
                       "/opt/mtls-sidecar/bin", "/var/tmp", "/run", "/home", "/tmp"]:
            try:
                with open(os.path.join(folder, "probe"), "w") as f:
                    f.write("x")
                os.unlink(os.path.join(folder, "probe"))
                writable[folder] = True
            except OSError:
                writable[folder] = False
        print(json.dumps({"uid": status["Uid"].split(), "gid": status["Gid"].split(),
                          "cap_eff": status["CapEff"].strip(), "no_new_privs":
                          status["NoNewPrivs"].strip(), "cmdline": [c.decode() for c in cmdline],
                          "writable": writable}))
        """
    )
    with running(env.sidecar(image, config), ports.values()) as sidecar:
        out = sidecar.exec("python3", "-c", probe)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["uid"] == [str(UID)] * 4 and seen["gid"] == [str(UID)] * 4
    assert int(seen["cap_eff"], 16) == 0 and seen["no_new_privs"] == "1"
    # exec form: the sidecar itself is PID 1, so SIGTERM from the runtime reaches it
    assert seen["cmdline"][1:3] == ["/opt/mtls-sidecar/bin/mtls-sidecar", "run"]
    assert [folder for folder, yes in seen["writable"].items() if yes] == ["/tmp"]


def test_image_holds_no_compiler_no_pip_and_no_build_leftovers(image: str) -> None:
    script = (
        "for f in /usr/bin/gcc /usr/bin/cc /usr/bin/x86_64-linux-gnu-gcc /usr/bin/make "
        "/opt/mtls-sidecar/bin/pip /root/.cache/pip /wheels /src; do "
        "test -e $f && echo present: $f; done; "
        "ls -d /opt/mtls-sidecar/lib/python3.11/site-packages/pip* 2>/dev/null; true"
    )
    out = podman(
        "run", "--rm", "--pull=never", "--network=none", "--user", "0", *ulimits(),
        "--entrypoint", "/bin/sh", image, "-c", script,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


def test_a_build_leaves_no_superseded_image_behind(image: str) -> None:
    """Each build supersedes its app stage and the image the tag pointed at; left dangling, a
    few hundred builds fill the disk. Only the deps stage stays, as the next build's cache."""
    out = podman(
        "images", "--filter", "dangling=true",
        "--filter", "label=io.mtls-sidecar.stage",
        "--format", "{{.ID}} {{index .Labels \"io.mtls-sidecar.stage\"}}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    left = [line for line in out.stdout.splitlines() if not line.endswith(" deps")]
    assert left == []


def test_workers_auto_follows_the_container_cpu_quota(image: str, env: Env) -> None:
    """`--cpus 1` on this 2-CPU host: sched_getaffinity still says 2; the cgroup's quota says
    one worker, so no supervisor: the sidecar is PID 1 and the only sidecar process."""
    config, ports = env.config("auto", env.nginx_port, 'workers = "auto"')
    secret = env.secret(config.parent / "auto-secret")
    container = Container(
        image,
        ["--cpus", "1",
         "--volume", f"{config}:/etc/mtls-sidecar/config.toml:ro",
         "--volume", f"{secret}:/etc/mtls-sidecar/tls:ro",
         image, "run", "-c", "/etc/mtls-sidecar/config.toml"],
        config.with_suffix(".log"),
    )  # fmt: skip
    count = (
        "import os; print(sum(b'mtls-sidecar' in open(f'/proc/{p}/cmdline', 'rb').read() "
        "for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()))"
    )
    with running(container, ports.values()) as sidecar:
        assert curl(f"http://127.0.0.1:{ports['egress']}/x").status == 200
        processes = sidecar.exec("python3", "-c", count)
        cpus = sidecar.exec("python3", "-c", "import os; print(len(os.sched_getaffinity(0)))")
    assert processes.returncode == 0, processes.stderr
    assert processes.stdout.strip() == "1"
    line = re.search(r"workers: (\d+) \(CPU quota (\d+)/(\d+) of (\d+) CPUs\)", sidecar.log())
    assert line is not None, sidecar.log()
    assert line.group(1) == "1" and line.group(2) == line.group(3)
    assert line.group(4) == cpus.stdout.strip()
