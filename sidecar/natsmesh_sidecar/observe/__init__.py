"""Observability: metrics and the admin server, access log, traces, tap.

Imports only the contract modules at the package root. Nothing here is
imported eagerly by this ``__init__``: tracing/otlp load only with an OTLP
endpoint and tap only once someone taps (tests/unit/sidecar/test_sidecar_imports.py).
"""
