"""The change tier: continuous traffic while the mesh changes (make test-change)."""
