"""The drift loop pauses with kopf on a standby replica and resumes after it.

One operator with kopf peering (namespaced: a KopfPeering per namespace) and
a drift loop every second. A peer of a higher priority written into the
peering objects (what a second, preferred replica's keep-alive writes) makes
kopf pause this replica; the loop must run no drift check meanwhile (two
replicas would both write), and run again once the peer is gone. Nor may the
operator's own watches start a pass on the paused replica: a deleted creds
Secret is left to the active replica, and repaired here once this one is.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from pathlib import Path

import pytest

from natsmesh_operator.webhook.inject import creds_secret_name
from tests.fixtures.cluster import Cluster
from tests.fixtures.operator import (
    OperatorProcess,
    kopf_peering,
    operator_namespace,
    start_operator,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PEERING = "natsmesh-drift"
OTHER = "preferred-replica"
SERVICE = """
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata:
  name: ledger
spec:
  service: ledger
  selector:
    matchLabels:
      app: ledger
  port: 8080
"""


def drift_checks(op: OperatorProcess) -> float:
    m = re.search(
        r'^natsmesh_operator_reconciles_total\{kind="NatsService",result="drift"\} (\S+)$',
        op.metrics(),
        re.M,
    )
    return float(m.group(1)) if m else 0.0  # no sample before the first check


def set_other_peer(op: OperatorProcess, namespaces: list[str], present: bool) -> None:
    record = {
        "priority": 2_000_000_000,  # above any random one (settings.py)
        "lifetime": 600,
        "lastseen": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    patch = json.dumps({"status": {OTHER: record if present else None}})
    for ns in namespaces:
        op.cluster.kubectl("patch", "kopfpeering", PEERING, "-n", ns, "--type=merge", "-p", patch)


def test_standby_replica_runs_no_drift_check(crds: Cluster, tmp_path: Path) -> None:
    with (
        start_operator(crds, tmp_path, endpoints_interval=1, peering=PEERING) as op,
        operator_namespace(op) as ns,
    ):
        kopf_peering(op.cluster, PEERING, ns)
        op.cluster.kubectl("apply", "-n", ns, "-f", "-", input=SERVICE)
        op.wait_ready("natsservice", "ledger", ns, timeout=30)
        secret = creds_secret_name("ledger")

        def present() -> bool:
            out = op.cluster.kubectl(
                "get", "secret", secret, "-n", ns, "--ignore-not-found", "-o", "name"
            )
            return bool(out.stdout.strip())

        assert present()
        # Active: the loop checks every second.
        before = drift_checks(op)
        op.wait_for("a drift check", lambda: drift_checks(op) > before, timeout=10)

        peerings = [op.namespace, ns]
        set_other_peer(op, peerings, present=True)
        try:
            op.wait_for("kopf to pause", lambda: "Pausing operations" in op.tail(), timeout=15)
            time.sleep(1.5)  # a tick that read the peering before the patch
            paused_at = drift_checks(op)
            # What the creds watch sees and would repair at once when active.
            op.cluster.kubectl("delete", "secret", secret, "-n", ns)
            time.sleep(4)  # four intervals
            assert drift_checks(op) == paused_at
            assert not present(), "a paused replica repaired the Secret"
        finally:
            set_other_peer(op, peerings, present=False)
        op.wait_for("a drift check again", lambda: drift_checks(op) > paused_at, timeout=10)
        op.wait_for("the Secret repaired", present, timeout=15)
