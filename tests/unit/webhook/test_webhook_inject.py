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


def test_app_containers_untouched_without_proxy_annotation() -> None:
    out = inject.injection(pod(), TARGET, InjectionSettings())
    assert "containers" not in out["spec"]
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
