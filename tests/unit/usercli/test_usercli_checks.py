"""``natsmesh check``'s decisions without a cluster: versions, CRD currency, readiness,
which webhooks belong to a release, what NATS's VARZ and JSZ answers mean, and
the verdict lines and exit status."""

from __future__ import annotations

import asyncio
import base64
import copy
import ssl
from pathlib import Path
from typing import Any, cast

import pytest
from lightkube.resources.apps_v1 import Deployment

from natsmesh_operator.api import NatsRoute, NatsService
from natsmesh_operator.crdgen.crd import crd
from natsmesh_operator.usercli import kubeaccess, natsinfo, release, webhooks
from natsmesh_operator.usercli.checks import (
    CheckResult,
    crd_differences,
    deployment_result,
    exit_code,
    render,
    server_version,
)
from natsmesh_operator.usercli.view import ConsumerLag
from natsmesh_operator.webhook.certgen import make_ca_and_cert

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("info", "want"),
    [
        ({"major": "1", "minor": "36", "gitVersion": "v1.36.3"}, (1, 36)),
        ({"major": "1", "minor": "31+", "gitVersion": "v1.31.2-eks-1"}, (1, 31)),
        ({"gitVersion": "v1.30.0"}, (1, 30)),
        ({"major": "", "minor": "", "gitVersion": "weird"}, None),
    ],
)
def test_server_version(info: dict[str, str], want: tuple[int, int] | None) -> None:
    assert server_version(info) == want


def installed(resource: type[NatsService] | type[NatsRoute]) -> dict[str, Any]:
    """The generated CRD as the API server returns it: plus status and defaults."""
    live = copy.deepcopy(crd(resource))
    live["spec"]["conversion"] = {"strategy": "None"}
    live["metadata"]["uid"] = "x"
    live["status"] = {"conditions": [{"type": "Established", "status": "True"}]}
    return live


def test_an_installed_crd_equal_to_the_generated_one_is_current() -> None:
    for resource in (NatsService, NatsRoute):
        assert crd_differences(installed(resource), crd(resource)) == []


def test_crd_differences_name_what_is_stale() -> None:
    live = installed(NatsService)
    version = live["spec"]["versions"][0]
    del version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["events"]
    version["additionalPrinterColumns"] = version["additionalPrinterColumns"][:2]
    live["spec"]["names"]["shortNames"] = ["ns"]
    live["status"]["conditions"] = [{"type": "Established", "status": "False"}]
    assert crd_differences(live, crd(NatsService)) == [
        "names.shortNames differs",
        "v1alpha1 schema differ",
        "v1alpha1 printer columns differ",
        "not Established",
    ]
    live["spec"]["versions"][0]["name"] = "v1alpha0"
    assert "version v1alpha1 missing" in crd_differences(live, crd(NatsService))


@pytest.mark.parametrize(
    ("desired", "ready", "available", "verdict", "text"),
    [
        (2, 2, 2, "PASS", "op: 2/2 ready"),
        (2, 1, 1, "WARN", "op: 1/2 ready"),
        (2, 0, 0, "FAIL", "op: 0/2 ready"),
        (0, 0, 0, "FAIL", "op: scaled to 0 replicas"),
    ],
)
def test_deployment_result(
    desired: int, ready: int, available: int, verdict: str, text: str
) -> None:
    assert deployment_result("op", desired, ready, available) == (verdict, text)


def test_results_render_one_line_each_and_a_fix_only_when_needed() -> None:
    results = [
        CheckResult("kubernetes api", "PASS", "ok", "never shown"),
        CheckResult("nats", "FAIL", "down", "port-forward"),
        CheckResult("bootstrap root key", "WARN", "root in cluster", "move it"),
        CheckResult("namespaces", "SKIP", "needs the CRDs"),
    ]
    lines = render(results).splitlines()
    assert lines[0].split(None, 1) == ["PASS", "kubernetes api                ok"]
    assert lines[1].startswith("FAIL  nats ")
    assert lines[1].endswith("  down")
    assert lines[2].strip() == "fix: port-forward"
    assert lines[3].startswith("WARN  bootstrap root key")
    assert lines[4].strip() == "fix: move it"
    assert lines[5].startswith("SKIP  namespaces")
    assert lines[-1] == "1 passed, 1 warning, 1 failed, 1 skipped"
    assert render([*results, results[2]]).splitlines()[-1] == (
        "1 passed, 2 warnings, 1 failed, 1 skipped"
    )
    assert exit_code(results) == 1
    assert exit_code([r for r in results if r.status != "FAIL"]) == 0


def hook_config(name: str, hooks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "webhooks": hooks}


def test_release_webhooks_are_the_natsmesh_ones_pointing_at_the_release() -> None:
    bundle = base64.b64encode(b"PEM").decode()
    configs = [
        (
            "MutatingWebhookConfiguration",
            hook_config(
                "natsmesh",
                [
                    {
                        "name": "inject.natsmesh.io",
                        "clientConfig": {
                            "service": {"name": "natsmesh-webhook", "namespace": "natsmesh-system"},
                            "caBundle": bundle,
                        },
                    }
                ],
            ),
        ),
        # Another release's, and somebody else's webhook.
        (
            "MutatingWebhookConfiguration",
            hook_config(
                "other",
                [
                    {
                        "name": "inject.natsmesh.io",
                        "clientConfig": {"service": {"name": "w", "namespace": "elsewhere"}},
                    },
                    {
                        "name": "sidecar.istio.io",
                        "clientConfig": {"service": {"name": "w", "namespace": "natsmesh-system"}},
                    },
                ],
            ),
        ),
        # A self-registered operator: a URL, named after its namespace.
        (
            "ValidatingWebhookConfiguration",
            hook_config(
                "natsmesh-natsmesh-system",
                [
                    {
                        "name": "validate.natsmesh.io",
                        "clientConfig": {
                            "url": "https://127.0.0.1:9443/validate",
                            "caBundle": "%%",
                        },
                    }
                ],
            ),
        ),
    ]
    found = webhooks.release_webhooks(configs, "natsmesh-system")
    assert [(h.kind, h.config, h.name) for h in found] == [
        ("MutatingWebhookConfiguration", "natsmesh", "inject.natsmesh.io"),
        ("ValidatingWebhookConfiguration", "natsmesh-natsmesh-system", "validate.natsmesh.io"),
    ]
    assert found[0].ca_bundle == b"PEM"
    assert found[0].address == ("natsmesh-webhook.natsmesh-system.svc", 443)
    assert found[1].ca_bundle == b""  # not base64: as good as none
    assert found[1].address == ("127.0.0.1", 9443)


async def test_serving_cert_verified_by_its_ca_and_refused_by_another(tmp_path: Path) -> None:
    make_ca_and_cert(tmp_path / "right", ["127.0.0.1"])
    make_ca_and_cert(tmp_path / "wrong", ["127.0.0.1"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "right" / "tls.crt", tmp_path / "right" / "tls.key")

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        right = (tmp_path / "right" / "ca.crt").read_bytes()
        wrong = (tmp_path / "wrong" / "ca.crt").read_bytes()
        assert await webhooks.verify_serving_cert("127.0.0.1", port, right) is None
        problem = await webhooks.verify_serving_cert("127.0.0.1", port, wrong)
        assert problem is not None
        assert "certificate" in problem
    finally:
        server.close()
        await server.wait_closed()
    with pytest.raises(OSError, match=r"Connect call failed|refused"):
        await webhooks.verify_serving_cert("127.0.0.1", port, right)


def test_parse_jsz_keys_consumers_by_namespace_stream_and_name() -> None:
    answers: list[dict[str, Any]] = [
        {
            "data": {
                "account_details": [
                    {
                        "name": "shop",
                        "id": "ACX",
                        "stream_detail": [
                            {
                                "name": "EVENTS_orders",
                                "consumer_detail": [
                                    {
                                        "name": "payments--orders--order_created",
                                        "num_pending": 4,
                                        "num_ack_pending": 1,
                                        "num_redelivered": 2,
                                    }
                                ],
                            },
                            {"name": "EVENTS_quiet"},
                        ],
                    }
                ]
            }
        },
        {"data": {}},  # a server with no JetStream assets
    ]
    assert natsinfo.parse_jsz(answers) == {
        ("shop", "EVENTS_orders", "payments--orders--order_created"): ConsumerLag(4, 1, 2)
    }


def varz(name: str, operator: str, js: bool = True) -> dict[str, Any]:
    return {
        "server_name": name,
        "version": "2.15.1",
        "trusted_operators_claim": [{"sub": operator}] if operator else [],
        "jetstream": {"config": {"max_memory": 1}} if js else {},
    }


def test_assess_wants_every_server_in_operator_mode_with_jetstream() -> None:
    assert natsinfo.assess([varz("a", "OP"), varz("b", "OP")], "OP") == (
        [],
        ["2 server(s), nats-server 2.15.1", "operator mode", "JetStream on"],
    )
    problems, _ = natsinfo.assess([varz("a", "OP"), varz("b", "OTHER", js=False)], "OP")
    assert problems == [
        "not in operator mode with the bootstrap's operator OP...: b",
        "JetStream off: b",
    ]
    assert natsinfo.assess([], "OP")[0] == ["no server answered VARZ"]


def test_port_forward_hint_names_the_service_of_an_in_cluster_url() -> None:
    hint = natsinfo.port_forward_hint(
        "nats://natsmesh-nats.natsmesh-system.svc:4222", "natsmesh-system"
    )
    assert "kubectl -n natsmesh-system port-forward svc/natsmesh-nats 4222:4222" in hint
    assert "--nats-url" in natsinfo.port_forward_hint("nats://10.0.0.1:4222", "x")


def test_kubeconfig_order_flag_then_env_list_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    second.write_text("x")
    flag = tmp_path / "flag"
    assert kubeaccess.kubeconfig_path(flag, str(second)) == flag
    # The first file of the list that exists.
    assert kubeaccess.kubeconfig_path(None, f"{first}:{second}") == second
    monkeypatch.setenv("HOME", str(tmp_path))
    assert kubeaccess.kubeconfig_path(None, None) is None  # then: in-cluster
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("x")
    assert kubeaccess.kubeconfig_path(None, "") == tmp_path / ".kube" / "config"


def test_release_reads_the_operator_containers_plain_variables() -> None:
    deployment = cast(
        Deployment,
        Deployment.from_dict(
            {
                "metadata": {"name": "natsmesh-operator"},
                "spec": {
                    "selector": {"matchLabels": {"a": "b"}},
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "helper",
                                    "env": [{"name": "NATSMESH_NATS_URL", "value": "no"}],
                                },
                                {
                                    "name": "operator",
                                    "env": [
                                        {
                                            "name": "NATSMESH_NATS_URL",
                                            "value": "nats://n.ns.svc:4222",
                                        },
                                        {
                                            "name": "NATSMESH_WATCH_NAMESPACES",
                                            "value": "shop, team-*",
                                        },
                                        {
                                            "name": "NATSMESH_OPERATOR_NAMESPACE",
                                            "valueFrom": {
                                                "fieldRef": {"fieldPath": "metadata.namespace"}
                                            },
                                        },
                                        {"name": "OTHER", "value": "x"},
                                    ],
                                },
                            ]
                        }
                    },
                },
            }
        ),
    )
    env = release.operator_env(deployment)
    assert env == {
        "NATSMESH_NATS_URL": "nats://n.ns.svc:4222",
        "NATSMESH_WATCH_NAMESPACES": "shop, team-*",
    }
    rel = release.Release("ns", (deployment,), env)
    assert rel.nats_url == "nats://n.ns.svc:4222"
    assert rel.bootstrap_secret == "natsmesh-nats-bootstrap"
    assert rel.watched("team-a")
    assert rel.watched("shop")
    assert not rel.watched("other")
    assert release.Release("ns").nats_url == "nats://127.0.0.1:4222"


def test_serving_cert_checked_offline_for_the_service_name(tmp_path: Path) -> None:
    """From outside the cluster: the certificate in the operator's Secret, the name
    the API server dials (<service>.<namespace>.svc), the caBundle's CAs."""
    host = "natsmesh-webhook.natsmesh-system.svc"
    make_ca_and_cert(tmp_path / "right", [host])
    make_ca_and_cert(tmp_path / "wrong", [host])
    cert = (tmp_path / "right" / "tls.crt").read_bytes()
    right = (tmp_path / "right" / "ca.crt").read_bytes()
    assert webhooks.verify_offline(cert, right, host) is None
    assert webhooks.verify_offline(cert, (tmp_path / "wrong" / "ca.crt").read_bytes(), host) == (
        "validation failed: candidates exhausted: signature does not match"
    )
    assert webhooks.verify_offline(cert, right, "other.natsmesh-system.svc") == (
        "validation failed: leaf certificate has no matching subjectAltName"
    )
    junk = webhooks.verify_offline(b"junk", right, host)
    assert junk is not None
    assert junk.startswith("not PEM certificates")


def test_serving_secret_is_the_one_mounted_at_the_cert_dir() -> None:
    deployment = cast(
        Deployment,
        Deployment.from_dict(
            {
                "metadata": {"name": "op"},
                "spec": {
                    "selector": {"matchLabels": {"a": "b"}},
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "operator",
                                    "volumeMounts": [
                                        {"name": "tmp", "mountPath": "/tmp"},
                                        {"name": "webhook-tls", "mountPath": "/tls"},
                                    ],
                                }
                            ],
                            "volumes": [
                                {"name": "tmp", "emptyDir": {}},
                                {
                                    "name": "webhook-tls",
                                    "secret": {"secretName": "rel-webhook-tls"},
                                },
                            ],
                        }
                    },
                },
            }
        ),
    )
    env = {"NATSMESH_WEBHOOK_CERT_DIR": "/tls/"}
    assert release.serving_secret(release.Release("ns", (deployment,), env)) == "rel-webhook-tls"
    assert release.serving_secret(release.Release("ns", (deployment,), {})) is None
    assert release.serving_secret(release.Release("ns", (), env)) is None
