"""Prometheus metrics of the operator (served on the metrics port at /metrics).

A registry of our own, not the global one, so tests can read exact values and
nothing a library registers leaks into the operator's exposition.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OperatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "natsmesh_operator_reconciles",
            "Handler runs by kind and result",
            ["kind", "result"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "natsmesh_operator_reconcile_duration_seconds",
            "Handler duration by kind",
            ["kind"],
            registry=r,
        )
        self.passes = Counter(
            "natsmesh_operator_mesh_passes", "Mesh passes by result", ["result"], registry=r
        )
        self.pass_duration = Histogram(
            "natsmesh_operator_mesh_pass_duration_seconds", "Mesh pass duration", registry=r
        )
        self.managed = Gauge(
            "natsmesh_operator_managed_objects", "Managed resources by kind", ["kind"], registry=r
        )
        self.creds_issued = Counter(
            "natsmesh_operator_creds_issued", "Creds Secrets issued or re-issued", registry=r
        )
        self.revocations_held = Gauge(
            "natsmesh_operator_revocations_held",
            "Old user keys of narrowed services still valid, waiting for their sidecars "
            "to take the new creds up (bounded by the revocation grace)",
            registry=r,
        )
        self.held_revocations = Counter(
            "natsmesh_operator_held_revocations",
            "Held revocations carried out, by why: no connection used the old key, the "
            "grace expired, or the service was deleted",
            ["why"],
            registry=r,
        )
        self.revocation_hold = Histogram(
            "natsmesh_operator_revocation_hold_seconds",
            "Seconds an old user key stayed valid after a narrowing re-issue",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 90, 120, 300),
            registry=r,
        )
        self.endpoint_counts = Counter(
            "natsmesh_operator_endpoint_counts",
            "Namespaces' live endpoints counted ($SRV.PING), coalesced",
            registry=r,
        )
        self.endpoint_writes = Counter(
            "natsmesh_operator_endpoint_writes",
            "status.endpoints patches (only counts that changed)",
            registry=r,
        )
        self.creds_repairs = Counter(
            "natsmesh_operator_creds_repairs",
            "Passes asked for because a creds Secret was deleted",
            registry=r,
        )
        self.jetstream_repairs = Counter(
            "natsmesh_operator_jetstream_repairs",
            "Passes asked for because a stream or consumer was deleted",
            registry=r,
        )
        self.admissions = Counter(
            "natsmesh_operator_webhook_admissions",
            "Admission reviews by webhook and outcome",
            ["webhook", "outcome"],
            registry=r,
        )
        self.admission_duration = Histogram(
            "natsmesh_operator_webhook_duration_seconds",
            "Admission review duration",
            ["webhook"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.rollouts = Counter(
            "natsmesh_operator_rollout_restarts",
            "Workloads restarted for (un)injection",
            ["kind"],
            registry=r,
        )
        self._zero_failures()

    def _zero_failures(self) -> None:
        """Expose the failure series at 0 from the start.

        A labelled counter has no series until its first inc(), so an alert
        on ``increase(...{result="retry"}[10m])`` would see nothing (not 0) on
        a healthy operator, and a typo in it would go unnoticed. The
        Prometheus guidelines: initialise the label sets you know.
        """
        for kind in ("NatsService", "NatsRoute"):
            for result in ("ok", "retry"):
                self.reconciles.labels(kind=kind, result=result)
        for result in ("ok", "error"):
            self.passes.labels(result=result)
        for webhook in ("inject", "validate"):
            self.admissions.labels(webhook=webhook, outcome="error")


METRICS = OperatorMetrics()
