"""The injected sidecar is a hardened native sidecar, and injection keeps the author's spec."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from natsmesh_operator.webhook import inject
from natsmesh_operator.webhook.inject import InjectionSettings, Target

TARGET = Target("orders", "shop", "v2", 8080, "natsmesh-orders-creds")


def pod(**annotations: str) -> dict[str, Any]:
    return {
        "metadata": {
            "generateName": "orders-",
            "labels": {"app": "orders"},
            "annotations": annotations,
        },
        "spec": {
            "initContainers": [{"name": "migrate", "image": "m:1"}],
            "containers": [{"name": "app", "image": "a:1", "env": [{"name": "X", "value": "1"}]}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_sidecar_is_first_native_init_container() -> None:
    out = inject.injection(pod(), TARGET, InjectionSettings())
    init = out["spec"]["initContainers"]
    assert [c["name"] for c in init] == [inject.SIDECAR_NAME, "migrate"]
    assert init[0]["restartPolicy"] == "Always"


def test_sidecar_is_hardened() -> None:
    sidecar = inject.injection(pod(), TARGET, InjectionSettings())["spec"]["initContainers"][0]
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["resources"]["limits"]["memory"]
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_sidecar_env_names_the_service_and_mounted_creds() -> None:
    settings = InjectionSettings(nats_url="nats://nats.mesh:4222", extra_env={"NATSMESH_X": "y"})
    sidecar = inject.injection(pod(), TARGET, settings)["spec"]["initContainers"][0]
    env = env_of(sidecar)
    assert env["NATSMESH_SERVICE"] == "orders"
    assert env["NATSMESH_NAMESPACE"] == "shop"
    assert env["NATSMESH_VERSION"] == "v2"
    assert env["NATSMESH_APP_PORT"] == "8080"
    assert env["NATSMESH_APP_PROTOCOL"] == "http"
    assert env["NATSMESH_NATS_URL"] == "nats://nats.mesh:4222"
    assert env["NATSMESH_X"] == "y"
    mount = sidecar["volumeMounts"][0]
    assert env["NATSMESH_CREDS_FILE"] == f"{mount['mountPath']}/{inject.CREDS_KEY}"
    assert mount["readOnly"] is True


def test_a_grpc_service_tells_its_sidecar_to_speak_http2_to_the_app() -> None:
    target = dataclasses.replace(TARGET, protocol="grpc")
    sidecar = inject.injection(pod(), target, InjectionSettings())["spec"]["initContainers"][0]
    assert env_of(sidecar)["NATSMESH_APP_PROTOCOL"] == "grpc"


def test_creds_volume_added_and_author_volumes_kept() -> None:
    volumes = inject.injection(pod(), TARGET, InjectionSettings())["spec"]["volumes"]
    assert volumes[0] == {"name": "data", "emptyDir": {}}
    assert volumes[1]["secret"]["secretName"] == "natsmesh-orders-creds"


def test_app_container_only_gets_its_prestop_hook_without_proxy_annotation() -> None:
    source = pod()
    out = inject.injection(source, TARGET, InjectionSettings())
    (app,) = out["spec"]["containers"]
    del app["lifecycle"]
    assert app == source["spec"]["containers"][0]
    assert out["metadata"]["annotations"][inject.ANNOTATION_INJECTED] == "true"
    assert out["metadata"]["labels"] == {"app": "orders", inject.LABEL_INJECTED: "true"}


def test_proxy_env_annotation_sets_http_proxy_but_keeps_existing_env() -> None:
    source = pod(**{inject.ANNOTATION_PROXY_ENV: "true"})
    out = inject.injection(source, TARGET, InjectionSettings())
    env = env_of(out["spec"]["containers"][0])
    assert env["HTTP_PROXY"] == "http://127.0.0.1:15001"
    assert env["X"] == "1"
    assert "HTTP_PROXY" not in env_of(source["spec"]["containers"][0]), "input not mutated"


def test_injection_does_not_mutate_its_input() -> None:
    source = pod()
    before = copy.deepcopy(source)
    inject.injection(source, TARGET, InjectionSettings())
    assert source == before


def test_opt_out_and_already_injected_are_left_alone() -> None:
    assert inject.wants_injection(pod())
    assert not inject.wants_injection(pod(**{inject.ANNOTATION_INJECT: "false"}))
    injected = pod()
    injected["spec"]["initContainers"] = inject.injection(injected, TARGET, InjectionSettings())[
        "spec"
    ]["initContainers"]
    assert not inject.wants_injection(injected)


def prestop_of(out: dict[str, Any], index: int = 0) -> dict[str, Any] | None:
    hook: dict[str, Any] | None = (
        out["spec"].get("containers", [{}] * (index + 1))[index].get("lifecycle") or {}
    ).get("preStop")
    return hook


def test_app_prestop_hook_calls_its_own_sidecar_with_the_pod_token() -> None:
    source = pod()
    source["spec"]["terminationGracePeriodSeconds"] = 45
    out = inject.injection(source, TARGET, InjectionSettings())
    hook = prestop_of(out)
    assert hook is not None
    get = hook["httpGet"]
    assert (get["path"], get["port"]) == ("/prestop", inject.ADMIN_PORT)
    (header,) = get["httpHeaders"]
    assert header["name"] == "Nm-Prestop-Token"
    env = env_of(out["spec"]["initContainers"][0])
    assert env["NATSMESH_PRESTOP_TOKEN"] == header["value"]
    assert len(header["value"]) == 32
    # Past the pod's grace period: by then a stopping pod is gone.
    assert env["NATSMESH_PRESTOP_HOLD_SECONDS"] == "75"
    # The hook holds the app back at most half the grace.
    assert env["NATSMESH_PRESTOP_WAIT_SECONDS"] == "22"
    again = inject.injection(pod(), TARGET, InjectionSettings())
    other = env_of(again["spec"]["initContainers"][0])["NATSMESH_PRESTOP_TOKEN"]
    assert other != header["value"], "a token per pod, not per service"


def test_no_prestop_hook_where_the_author_has_one_or_nothing_reaches_the_app() -> None:
    own = pod()
    own["spec"]["containers"][0]["lifecycle"] = {"preStop": {"sleep": {"seconds": 5}}}
    out = inject.injection(own, TARGET, InjectionSettings())
    assert "containers" not in out["spec"], "the author's hook is kept as it is"
    assert "NATSMESH_PRESTOP_TOKEN" not in env_of(out["spec"]["initContainers"][0])
    client = dataclasses.replace(TARGET, receives=False)
    out = inject.injection(pod(), client, InjectionSettings())
    assert "containers" not in out["spec"]
    assert "NATSMESH_PRESTOP_TOKEN" not in env_of(out["spec"]["initContainers"][0])


def test_prestop_hook_goes_on_the_container_with_the_app_port_only() -> None:
    source = pod(**{inject.ANNOTATION_PROXY_ENV: "true"})
    source["spec"]["containers"] = [
        {"name": "logs", "image": "l:1"},
        {"name": "app", "image": "a:1", "ports": [{"containerPort": 8080}]},
    ]
    out = inject.injection(source, TARGET, InjectionSettings(), prestop_token="t0k")
    assert prestop_of(out, 0) is None
    hook = prestop_of(out, 1)
    assert hook is not None
    assert hook["httpGet"]["httpHeaders"][0]["value"] == "t0k"
    assert env_of(out["spec"]["containers"][1])["HTTP_PROXY"] == "http://127.0.0.1:15001"
    # Two containers and none with the app port: no guess.
    del source["spec"]["containers"][1]["ports"]
    out = inject.injection(source, TARGET, InjectionSettings())
    assert prestop_of(out, 0) is None
    assert prestop_of(out, 1) is None


def test_a_null_lifecycle_gets_the_hook_and_other_handlers_are_kept() -> None:
    source = pod()
    source["spec"]["containers"][0]["lifecycle"] = None
    assert prestop_of(inject.injection(source, TARGET, InjectionSettings())) is not None
    started = {"postStart": {"exec": {"command": ["true"]}}}
    source["spec"]["containers"][0]["lifecycle"] = started
    out = inject.injection(source, TARGET, InjectionSettings())
    lifecycle = out["spec"]["containers"][0]["lifecycle"]
    assert lifecycle["postStart"] == started["postStart"]
    assert "preStop" in lifecycle
    assert "preStop" not in started, "input not mutated"
