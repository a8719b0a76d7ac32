"""The demo's example apps (``python -m examples.apps.shop``)."""
