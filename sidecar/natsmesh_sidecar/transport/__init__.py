"""The NATS transport: unary calls (:mod:`.natsfast`), streamed calls
(:mod:`.stream`, imported only when a body streams) and micro discovery.

Imports only the contract modules at the package root.
"""
