"""Traffic policy: the route table, our namespace's targets, rule matching,
retries, circuit breaker, faults, and the sidecar's own publish permissions.

Decisions and the state they read; no sockets and no NATS requests of its
own beyond the KV reads of tables and targets. Imports only the contract
modules at the package root.
"""
