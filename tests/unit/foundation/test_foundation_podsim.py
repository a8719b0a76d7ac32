"""The pod emulator and the demo from a clone in any directory, and failing fast.

A clone under /tmp used to hang ``make demo``: the emulator rewrote the venv's
interpreter path like a path of the pod (the chart's pods mount an emptyDir at
/tmp), so no pod could start, and the demo waited on helm with nothing on
screen. These tests need no cluster: the emulator's pure parts, and the demo's
guard reading the emulator's registry.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import demo_traffic
from tests.e2e.local import snapshot
from tests.e2e.podsim import PodSim, SimPod, local_argv

pytestmark = pytest.mark.unit

CLONE_PY = "/tmp/x/.venv/bin/python"


def pod(container: dict[str, Any], name: str = "p-1") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", "namespace": "ns", "labels": {}},
        "spec": {
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def emulator(tmp_path: Path, program: str = CLONE_PY) -> PodSim:
    return PodSim(
        ["kubectl-not-called"],
        "ns",
        tmp_path / "pods",
        images={"natsmesh/sidecar": [program, "-m", "natsmesh_sidecar"]},
        commands={"nats-server": "/tmp/x/.venv/bin/nats-server"},
    )


def container_argv(sim: PodSim, spec: dict[str, Any]) -> tuple[list[str], Path]:
    p = pod(spec)
    simpod = sim._new_pod(p)
    volumes = sim._volumes(simpod, p, p["spec"]["volumes"])
    c = sim._container(simpod, p, spec, volumes, outbound=None, init=False)
    return c.argv, volumes["tmp"]


def test_local_argv_rewrites_only_what_the_spec_says() -> None:
    def rewrite(arg: str) -> str:
        return arg.replace("/tmp", "/pod/volumes/tmp")

    argv = local_argv([CLONE_PY, "-m", "mod"], ["--dir", "/tmp/data"], rewrite)
    assert argv == [CLONE_PY, "-m", "mod", "--dir", "/pod/volumes/tmp/data"]


def test_a_clone_under_tmp_keeps_its_interpreter(tmp_path: Path) -> None:
    sim = emulator(tmp_path)
    spec = {
        "name": "sidecar",
        "image": "registry.local/natsmesh/sidecar:0.1.0",
        "args": ["--scratch", "/tmp/scratch"],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    argv, tmp_volume = container_argv(sim, spec)
    assert argv[:3] == [CLONE_PY, "-m", "natsmesh_sidecar"]
    # What the spec names under the mount still goes to the pod's emptyDir.
    assert argv[3:] == ["--scratch", f"{tmp_volume}/scratch"]


def test_a_python_command_runs_this_interpreter_and_maps_its_arguments(tmp_path: Path) -> None:
    sim = emulator(tmp_path)
    spec = {
        "name": "job",
        "image": "natsmesh/sidecar:1",
        "command": ["/usr/local/bin/python3", "/tmp/run.py"],
        "args": ["--out=/data"],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    argv, tmp_volume = container_argv(sim, spec)
    assert argv == [sys.executable, f"{tmp_volume}/run.py", "--out=/data"]


def test_a_local_command_is_never_mapped_into_the_pod(tmp_path: Path) -> None:
    sim = emulator(tmp_path)
    spec = {
        "name": "nats",
        "image": "natsmesh/sidecar:1",
        "command": ["nats-server"],
        "args": ["-c", "/tmp/nats.conf"],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    argv, tmp_volume = container_argv(sim, spec)
    assert argv == ["/tmp/x/.venv/bin/nats-server", "-c", f"{tmp_volume}/nats.conf"]


def test_a_pod_whose_program_cannot_start_reports_it_at_once(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere" / "python")
    sim = emulator(tmp_path, program=missing)
    p = pod({"name": "app", "image": "natsmesh/sidecar:1"}, name="broken-1")
    simpod = sim._new_pod(p)
    sim.pods[simpod.uid] = simpod
    started = time.monotonic()
    sim._start_pod(simpod, p)
    assert time.monotonic() - started < 5
    assert "No such file or directory" in simpod.error
    assert missing in simpod.error
    # What the emulator publishes for the demo carries the error.
    (entry,) = snapshot({"ns": sim})["ns"]
    assert entry["error"] == simpod.error
    assert "broken-1" in entry["describe"]


def _registry(tmp_path: Path, pods: list[dict[str, Any]]) -> Path:
    path = tmp_path / "pods.json"
    path.write_text(json.dumps({"natsmesh-system": pods}))
    return path


def test_guard_stops_the_command_when_a_pod_cannot_start(tmp_path: Path) -> None:
    registry = _registry(
        tmp_path,
        [
            {"name": "ok-1", "labels": {}, "ready": True, "error": ""},
            {
                "name": "natsmesh-operator-0",
                "labels": {},
                "ready": False,
                "error": "[Errno 2] No such file or directory: 'python'",
                "describe": "pod natsmesh-operator-0: ready=False",
            },
        ],
    )
    started = time.monotonic()
    with pytest.raises(demo_traffic.DemoFailed) as failed:
        demo_traffic.guard(["sleep", "30"], registry)
    assert time.monotonic() - started < 5
    assert "pod natsmesh-operator-0 cannot start: [Errno 2] No such file" in str(failed.value)
    assert failed.value.code != 0


def test_guard_fails_when_the_emulator_is_gone(tmp_path: Path) -> None:
    registry = _registry(tmp_path, [])
    log = tmp_path / "nodes.log"
    log.write_text("Traceback: the emulator crashed\n")
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(demo_traffic.DemoFailed) as failed:
        demo_traffic.guard(["sleep", "30"], registry, gone.pid, str(log))
    assert "the emulator crashed" in str(failed.value)


def test_guard_passes_the_command_status_through(tmp_path: Path) -> None:
    registry = _registry(tmp_path, [{"name": "ok", "labels": {}, "ready": True, "error": ""}])
    assert demo_traffic.guard(["true"], registry) == 0
    assert demo_traffic.guard(["sh", "-c", "exit 3"], registry) == 3


def test_waiting_for_pods_fails_fast_on_a_broken_one(tmp_path: Path) -> None:
    registry = _registry(
        tmp_path, [{"name": "nats-0", "labels": {}, "ready": False, "error": "boom"}]
    )
    started = time.monotonic()
    with pytest.raises(demo_traffic.DemoFailed, match="pod nats-0 cannot start: boom"):
        demo_traffic.wait_pods(registry, "natsmesh-system", 1, timeout=60)
    assert time.monotonic() - started < 5


def test_simpod_describe_names_the_error(tmp_path: Path) -> None:
    p = SimPod(name="x", uid="u", namespace="ns", labels={}, spec={}, dir=tmp_path)
    p.error = "exec failed"
    assert "error=exec failed" in p.describe()
