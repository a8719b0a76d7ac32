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
    "prometheus-rule": {"metrics": {"prometheusRule": {"enabled": True}}},
    "crds-off": {"crds": {"enabled": False}},
    "crds-no-keep": {"crds": {"keep": False}},
    "operator-single-no-pdb": {
        "operator": {"replicas": 1, "podDisruptionBudget": {"enabled": False}}
    },
    "webhook-ignore": {"webhook": {"failurePolicy": "Ignore", "timeoutSeconds": 10}},
    "nats-routes-no-tls": {"nats": {"cluster": {"tls": {"enabled": False}}}},
    "nats-monitoring-exposed": {"nats": {"monitoring": {"expose": True}}},
    "network-policy-off": {"networkPolicy": {"enabled": False}, "mesh": {"networkPolicy": False}},
    "network-policy-restricted": {
        "networkPolicy": {
            "prometheusFrom": [
                {
                    "namespaceSelector": {"matchLabels": {"team": "observability"}},
                    "podSelector": {"matchLabels": {"app": "prom"}},
                }
            ],
            "nats": {"clientFrom": [{"namespaceSelector": {"matchLabels": {"admin": "yes"}}}]},
            "operator": {
                "webhookFrom": [{"ipBlock": {"cidr": "172.18.0.0/16"}}],
                "metricsFrom": [{"podSelector": {"matchLabels": {"app": "scraper"}}}],
            },
        },
    },
    "webhook-client-generated": {"webhook": {"clientAuth": {"enabled": True}}},
    "webhook-client-secret": {
        "webhook": {
            "clientAuth": {
                "enabled": True,
                "caSecret": {"name": "apiserver-client-ca", "key": "front-proxy-ca.crt"},
                "allowedNames": ["kube-apiserver", "kube-apiserver-webhook-client"],
            }
        }
    },
    "everything-on": {
        "webhook": {"certManager": {"enabled": True}, "clientAuth": {"enabled": True}},
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "dashboard": {"enabled": True},
            "prometheusRule": {"enabled": True},
        },
        "nats": {"replicas": 3, "monitoring": {"expose": True}, "maxControlLine": 65536},
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {"priorityClassName": "system-cluster-critical", "podLabels": {"a": "b"}},
    },
}
