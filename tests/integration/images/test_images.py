"""The container images from the Dockerfile, built here and run as a cluster would run them.

``hack/images.sh`` (``make images``) builds the base images (mmdebstrap), the
wheels (host, from the hashed locks) and the sidecar, operator and demo-app
images (the shop's HTTP app and its gRPC app); warm, it only asks Docker's layer cache. Then:

* every image runs as the numeric non-root user, carries no compiler, pip or
  setuptools, and the sidecar image has no kopf and no Kubernetes client;
* the gRPC example app's image imports grpcio and nothing of natsmesh;
* the sidecar container, run the way the injected pod spec runs it
  (``--read-only``, ``--user 65532:65532``, ``--cap-drop ALL``,
  ``no-new-privileges``), serves ``/healthz`` and ``/readyz``, answers a real
  call through NATS from a caller sidecar, and drains on ``docker stop``
  (exit 0, the in-flight call completes);
* its memory is read from its own cgroup (working set: usage minus inactive
  file cache, as the kubelet counts it; and RSS), idle and after a burst, and
  written to ``.work/measurements/sidecar-container.json``.

Skipped only when Docker is not installed and cannot be; ``make
test-integration`` runs the tier through hack/with-docker.sh, which starts an
engine that is not running (installing Debian's docker.io if missing) and
stops afterwards the one it started.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from natsmesh_sidecar.app import Sidecar
from tests.fixtures.nats_server import NatsServer, free_port
from tests.integration.sidecar.sidecar_harness import TestApp, destination, request, settings, table

REPO = Path(__file__).resolve().parents[3]
UID = "65532"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]
if shutil.which("docker") is None and shutil.which("dockerd") is None:
    pytestmark.append(pytest.mark.skip(reason="docker is not installed: image tests need it"))


class Images:
    def __init__(self, docker: str, names: list[str]) -> None:
        self.docker = docker
        self.base, self.build, self.sidecar, self.operator, self.app, self.stock = names

    def run(self, *argv: str, timeout: float = 120, check: bool = True) -> str:
        proc = subprocess.run([self.docker, *argv], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(argv)} failed:\n{proc.stderr}{proc.stdout}")
        return proc.stdout.strip()

    def python(self, image: str, code: str, *extra: str) -> str:
        return self.run(
            "run", "--rm", "--read-only", "--cap-drop", "ALL", *extra,
            "--entrypoint", "python3", image, "-c", code,
        )  # fmt: skip


@pytest.fixture(scope="module")
def images() -> Images:
    build = subprocess.run(
        [str(REPO / "hack" / "images.sh")], capture_output=True, text=True, timeout=1800
    )
    assert build.returncode == 0, f"hack/images.sh failed:\n{build.stdout}\n{build.stderr}"
    names = subprocess.run(
        [str(REPO / "hack" / "images.sh"), "--print"], capture_output=True, text=True, check=True
    ).stdout.split()
    docker = subprocess.run(
        [str(REPO / "hack" / "docker.sh"), "cli"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Images(docker, names)


def test_images_run_as_the_numeric_non_root_user(images: Images) -> None:
    for image in (images.sidecar, images.operator, images.app, images.stock):
        assert images.run("image", "inspect", "-f", "{{.Config.User}}", image) == f"{UID}:{UID}"
        # No --user here: the image's own default is what a pod without a
        # securityContext would get.
        out = images.python(image, "import os; print(os.getuid(), os.getgid())")
        assert out == f"{UID} {UID}", image
    # The uid has a name: kopf's peering identity uses getpass.getuser().
    for image in (images.sidecar, images.operator):
        assert images.python(image, "import getpass; print(getpass.getuser())") == "nonroot"


def test_runtime_images_carry_no_build_tools(images: Images) -> None:
    code = (
        "import shutil, importlib.util as u;"
        "print([t for t in ('gcc','cc','make','apt-get','pip','pip3') if shutil.which(t)],"
        " [m for m in ('pip','setuptools','ensurepip') if u.find_spec(m)])"
    )
    for image in (images.sidecar, images.operator, images.app, images.stock):
        assert images.python(image, code) == "[] []", image


def test_sidecar_image_has_no_kopf_and_no_kubernetes_client(images: Images) -> None:
    code = (
        "import importlib.util as u;"
        "print([m for m in ('kopf','kubernetes','kubernetes_asyncio','lightkube',"
        "'natsmesh_operator','aiohttp','prometheus_client') if u.find_spec(m)])"
    )
    assert images.python(images.sidecar, code) == "[]"
    # ... while the operator image has what it runs on.
    assert (
        images.python(images.operator, "import kopf, lightkube, natsmesh_operator.cli; print('ok')")
        == "ok"
    )


def test_root_filesystem_is_read_only_for_the_sidecar(images: Images) -> None:
    code = (
        "import errno\n"
        "for p in ('/app/x', '/venv/x', '/tmp/x', '/x'):\n"
        "    try:\n"
        "        open(p, 'w')\n"
        "        print('wrote', p)\n"
        "    except OSError as e:\n"
        "        print(errno.errorcode[e.errno])\n"
    )
    out = images.python(images.sidecar, code).split()
    assert out == ["EROFS"] * 4


def _cgroup_memory(docker: str, cid: str) -> dict[str, float]:
    """The container's memory from its cgroup (v1 or v2), in MB."""
    pid = subprocess.run(
        [docker, "inspect", "-f", "{{.State.Pid}}", cid], capture_output=True, text=True, check=True
    ).stdout.strip()
    cgroups = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in cgroups if ":memory:" in line]
    if v1:
        base = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/")
        usage = int((base / "memory.usage_in_bytes").read_text())
        stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
        inactive, rss = int(stat["total_inactive_file"]), int(stat["total_rss"])
    else:
        base = Path("/sys/fs/cgroup") / cgroups[0].split(":", 2)[2].lstrip("/")
        usage = int((base / "memory.current").read_text())
        stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
        inactive, rss = int(stat["inactive_file"]), int(stat["anon"])
    mb = 1024 * 1024
    return {
        "working_set_mb": round((usage - inactive) / mb, 1),
        "rss_mb": round(rss / mb, 1),
        "usage_mb": round(usage / mb, 1),
    }


async def adocker(images: Images, *argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        images.docker, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(argv)} failed:\n{err.decode()}{out.decode()}")
    return out.decode().strip()


async def test_sidecar_container_serves_and_drains_read_only_non_root_no_caps(
    images: Images, nats_server: NatsServer, tmp_path: Path
) -> None:
    app = await TestApp().start()
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "table.json").write_bytes(table("shop", "orders").to_json())
    cfg.chmod(0o755)
    (cfg / "table.json").chmod(0o644)
    admin_port, listen_port = free_port(), free_port()
    cid = await adocker(
        images, "run", "-d", "--name", f"natsmesh-sidecar-test-{admin_port}",
        "--read-only", "--user", f"{UID}:{UID}", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        # nats-server and the app listen on the host's loopback, as they
        # would on the pod's: the container shares the host's network.
        "--network", "host",
        "-v", f"{cfg}:/etc/natsmesh:ro",
        "-e", "NATSMESH_SERVICE=orders", "-e", "NATSMESH_NAMESPACE=shop",
        "-e", f"NATSMESH_NATS_URL={nats_server.url}",
        "-e", f"NATSMESH_APP_PORT={app.port}",
        "-e", f"NATSMESH_LISTEN_PORT={listen_port}",
        "-e", "NATSMESH_ADMIN_HOST=127.0.0.1", "-e", f"NATSMESH_ADMIN_PORT={admin_port}",
        "-e", "NATSMESH_TABLE_FILE=/etc/natsmesh/table.json",
        "-e", "NATSMESH_DRAIN_SECONDS=5",
        images.sidecar,
    )  # fmt: skip
    caller = Sidecar(
        settings("web", "shop", nats_server.url),
        table("shop", "web", destinations=[destination("shop", "orders")]),
    )
    try:
        measured = await _serve_and_drain(images, cid, admin_port, caller)
    finally:
        await caller.stop()
        await adocker(images, "rm", "-f", cid, check=False)
        await app.stop()
    measured["image_sizes_mb"] = {
        image: round(int(images.run("image", "inspect", "-f", "{{.Size}}", image)) / 1e6, 1)
        for image in (images.base, images.sidecar, images.operator, images.app)
    }
    measured["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = REPO / ".work" / "measurements" / "sidecar-container.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(measured, indent=2) + "\n")
    assert measured["idle"]["working_set_mb"] < 80, measured  # type: ignore[index]


async def _serve_and_drain(
    images: Images, cid: str, admin_port: int, caller: Sidecar
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    statuses: dict[str, int] = {}
    while loop.time() < deadline:
        try:
            statuses = {
                p: (await request(admin_port, "GET", p)).status for p in ("/healthz", "/readyz")
            }
            if all(s == 200 for s in statuses.values()):
                break
        except OSError:
            pass
        await asyncio.sleep(0.2)
    logs = await adocker(images, "logs", cid, check=False)
    assert statuses == {"/healthz": 200, "/readyz": 200}, logs
    uid = await adocker(images, "exec", cid, "python3", "-c", "import os; print(os.getuid())")
    assert uid == UID
    status = await adocker(
        images, "exec", cid, "python3", "-c", "print(open('/proc/1/status').read())"
    )
    cap_eff = next(line for line in status.splitlines() if line.startswith("CapEff"))
    assert cap_eff.split()[-1] == "0000000000000000"
    await asyncio.sleep(2)
    idle = await loop.run_in_executor(None, _cgroup_memory, images.docker, cid)

    await caller.start()
    await caller.wait_ready()
    for _ in range(500):
        r = await request(caller.outbound_port, "POST", "/echo", body=b"x" * 1024)
        assert r.status == 200
    loaded = await loop.run_in_executor(None, _cgroup_memory, images.docker, cid)
    # docker stop = SIGTERM: a call in flight completes, then exit 0.
    slow = asyncio.create_task(request(caller.outbound_port, "GET", "/sleep/800"))
    await asyncio.sleep(0.3)
    stop = asyncio.create_task(adocker(images, "stop", "-t", "20", cid))
    r = await slow
    assert (r.status, r.body) == (200, b"slept")
    await stop
    assert await adocker(images, "inspect", "-f", "{{.State.ExitCode}}", cid) == "0"
    # Nothing written: the only change is the mount point Docker made for the table.
    diff = (await adocker(images, "diff", cid)).splitlines()
    assert sorted(diff) == ["A /etc/natsmesh", "C /etc"]
    return {"idle": idle, "after_500_calls_1KiB": loaded}


def test_stock_image_has_grpcio_and_nothing_of_natsmesh(images: Images) -> None:
    code = (
        "import importlib.util as u, grpc;"
        "print(grpc.__version__,"
        " [m for m in ('natsmesh_sidecar', 'nats', 'kopf') if u.find_spec(m)])"
    )
    assert images.python(images.stock, code) == "1.85.1 []"
