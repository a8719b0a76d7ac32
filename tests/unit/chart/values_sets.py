"""Named values sets: every toggle of the chart, for lint and render tests."""

from __future__ import annotations

from typing import Any

EXTERNAL_URL = "nats://nats.example.internal:4222"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cert-manager": {"webhook": {"certManager": {"enabled": True}}},
    "cert-manager-cluster-issuer": {
        "webhook": {
            "certManager": {"enabled": True, "issuerRef": {"name": "ca", "kind": "ClusterIssuer"}}
        }
    },
    "nats-single": {"nats": {"replicas": 1}},
    "nats-cluster-5": {"nats": {"replicas": 5}},
    "nats-no-persistence": {"nats": {"jetstream": {"persistence": {"enabled": False}}}},
    "nats-external": {"nats": {"enabled": False, "external": {"url": EXTERNAL_URL}}},
    "nats-external-secret": {
        "nats": {
            "enabled": False,
            "external": {"url": EXTERNAL_URL, "bootstrapSecret": "my-nats-bootstrap"},
        }
    },
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True}}},
    "dashboard": {"metrics": {"dashboard": {"enabled": True}}},
    "crds-off": {"crds": {"enabled": False}},
    "crds-no-keep": {"crds": {"keep": False}},
    "operator-single-no-pdb": {
        "operator": {"replicas": 1, "podDisruptionBudget": {"enabled": False}}
    },
    "webhook-ignore": {"webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 10}},
    "everything-on": {
        "webhook": {"certManager": {"enabled": True}},
        "metrics": {"serviceMonitor": {"enabled": True}, "dashboard": {"enabled": True}},
        "nats": {"replicas": 3},
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {"priorityClassName": "system-cluster-critical", "podLabels": {"a": "b"}},
    },
}
