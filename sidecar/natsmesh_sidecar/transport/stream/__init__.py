"""Streamed bodies over NATS: what carries a body that does not fit one message.

Imported only when the first stream happens (a request body over the inline
limit, or an app response sent chunked or larger than one message): a
sidecar that never streams holds none of this code.

* :mod:`.protocol`: the wire format (header names, per-call subjects, the
  credit arithmetic) as pure functions;
* :mod:`.sender` / :mod:`.receiver`: one direction of a flow-controlled
  stream, the sending and the receiving end;
* :mod:`.caller`: the caller's sidecar (an upload from the app's client, a
  streamed response relayed to it);
* :mod:`.callee`: the callee's sidecar (an upload written into the app, the
  app's streamed response sent back);
* :mod:`.tunnel`: a WebSocket, both sidecars' ends: after the app's 101 a
  byte stream each way between the client's socket and the app's.

See docs/architecture.md, "Streamed bodies" and "WebSocket".
"""
