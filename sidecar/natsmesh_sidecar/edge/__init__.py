"""The HTTP edges: the outbound listener the app calls, the client that calls the app.

Imports the contract modules, :mod:`..observe` and :mod:`..transport`.
"""
