"""Outbound: the app's HTTP calls (parsed by natsmesh_sidecar.edge.listener) become NATS requests.

:class:`OutboundHandler` turns one parsed request into a response: resolve the
host in the route table, check the sidecar's own publish permissions, apply the
rule's circuit breaker, faults, timeout and retries, and map the reply back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, cast

from natsmesh_sidecar import codec, subjects
from natsmesh_sidecar.edge.listener import EVENTS_PREFIX, Done, Request, StreamedRequest
from natsmesh_sidecar.observe import accesslog
from natsmesh_sidecar.policy import resilience
from natsmesh_sidecar.policy.table import FORBIDDEN, FOUND, UNKNOWN
from natsmesh_sidecar.policy.targets import MISS
from natsmesh_sidecar.transport.natsfast import Reply
from natsmesh_sidecar.wire import CircuitBreaker, Destination, Rule, StreamLimits, Target

if TYPE_CHECKING:
    from natsmesh_sidecar.observe.metrics import Metrics
    from natsmesh_sidecar.observe.tap import Tap
    from natsmesh_sidecar.observe.tracing import Tracer
    from natsmesh_sidecar.policy.permissions import Permissions
    from natsmesh_sidecar.policy.table import Router
    from natsmesh_sidecar.policy.targets import TargetCache
    from natsmesh_sidecar.transport.natsfast import FastPath
    from natsmesh_sidecar.transport.stream.caller import CallerStream

logger = logging.getLogger(__name__)

_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
#: (status, headers, body, destination, route, attempts, error code)
Result = tuple[int, list[tuple[str, str]], bytes, str, str, int, str]
#: The outcome of a reply that says the response streams (natsmesh_sidecar.transport.stream).
STREAMED = "streamed"
#: Outcomes of an upload whose stream broke before any response.
_STREAM_BROKE = frozenset({"aborted", "bad_stream", "cut", "bad_subject"})


class _Plan:
    """A routed request: everything the NATS attempts and the answer need."""

    __slots__ = ("abort", "breaker", "delay", "dest_key", "head", "rule", "simple", "subject")

    def __init__(
        self,
        dest_key: str,
        rule: Rule,
        subject: str,
        breaker: resilience.Breaker | None,
        delay: float,
        abort: int | None,
        head: bytes,
    ) -> None:
        self.dest_key = dest_key
        self.rule = rule
        self.subject = subject
        self.breaker = breaker
        self.delay = delay
        self.abort = abort
        #: The NATS header block up to the per-attempt timeout (``_per_try``).
        self.head = head
        #: No retry and no breaker: a reply is the answer as it is (``_answer``).
        self.simple = breaker is None and rule.retries.attempts <= 0


class Mesh(Protocol):
    """What the handler reads per request because it changes while the sidecar
    runs: the NATS connection (reconnects, renewals), the route table and our
    namespace's targets (swaps), the publish permissions (new creds), the tap."""

    @property
    def nc(self) -> Any: ...
    @property
    def fast(self) -> FastPath | None: ...
    @property
    def router(self) -> Router: ...
    @property
    def targets(self) -> TargetCache | None: ...
    @property
    def permissions(self) -> Permissions: ...
    @property
    def tap(self) -> Tap | None: ...
    def max_body(self) -> int:
        """The largest body one NATS message carries on the current connection."""
        ...


#: An event's publish (natsmesh_sidecar.events.publisher): (status, headers, body).
PublishEvent = Callable[[Request, str], Awaitable[tuple[int, list[tuple[str, str]], bytes]]]
#: The circuit breaker of a subject under a rule's config.
BreakerOf = Callable[[str, CircuitBreaker], "resilience.Breaker | None"]


class OutboundHandler:
    """Turns one request into one response; never raises.

    :meth:`start` is the connection's entry: a request that needs nothing
    but one NATS request (no policy fetch, no fault delay, no retry) is
    answered from callbacks, without a task or a coroutine chain; anything
    else continues in a task running the same steps (:meth:`_finish_async`).

    Takes what it uses: ``mesh`` for the state that changes while the sidecar
    runs, the rest fixed at start.
    """

    def __init__(
        self,
        mesh: Mesh,
        *,
        namespace: str,
        service: str,
        metrics: Metrics,
        breaker: BreakerOf,
        publish_event: PublishEvent,
        stream_limits: StreamLimits,
        tracer: Tracer | None = None,
        access_log: bool = True,
    ) -> None:
        self.mesh = mesh
        self.namespace = namespace
        self.service = service
        #: Who we are in labels, logs and errors (``<service>.<namespace>``).
        self.source = subjects.host_of(namespace, service)
        #: Appended to a route table's base subjects: who we are, as callers.
        self.caller_suffix = subjects.caller_suffix(namespace, service)
        self.metrics = metrics
        self.breaker = breaker
        self.publish_event = publish_event
        self.stream_limits = stream_limits
        #: Set only with an OTLP endpoint (natsmesh_sidecar.observe.tracing).
        self.tracer = tracer
        self.access_log = access_log
        self.inflight = 0
        self._rand = random.random
        #: id(destination) -> what selecting its rule needs (:meth:`_select`).
        self._selection: dict[int, tuple[Destination, bool, Rule | None]] = {}

    def _select(self, dest: Destination) -> tuple[Destination, bool, Rule | None]:
        """(dest, whether a rule matches on headers, its sole rule if that rule
        matches on the path alone); cached per destination object, which the
        entry keeps alive so its id is not reused."""
        rules = dest.rules
        sole = rules[0] if len(rules) == 1 else None
        if sole is not None and (sole.match.methods or sole.match.headers):
            sole = None
        found = (dest, any(r.match.headers for r in rules), sole)
        if len(self._selection) >= 1024:
            self._selection.clear()  # tables were swapped many times
        self._selection[id(dest)] = found
        return found

    def start(self, req: Request, done: Done) -> bytes | None:
        """The response now, or None when ``done(req, response)`` will be called later."""
        t0 = time.perf_counter()
        rid = req.special.get("x-request-id") or codec.new_request_id()
        self.inflight += 1
        try:
            if req.__class__ is not Request:
                self._later(req, self._stream_call(cast(StreamedRequest, req), rid, t0), done)
                return None
            if req.path.startswith(EVENTS_PREFIX):
                self._later(req, self._finish_async(req, rid, t0, None), done)
                return None
            step = self._route(req, rid, MISS)
            if step.__class__ is not _Plan:
                if isinstance(step, tuple):
                    return self._respond(req, rid, t0, step)
                self._later(req, self._finish_async(req, rid, t0, step), done)
                return None
            plan = step
            if plan.delay or plan.abort is not None:
                self._later(req, self._finish_async(req, rid, t0, plan), done)
                return None
            deadline = time.monotonic() + plan.rule.timeout_ms / 1000.0
            limit, hdr = self._per_try(plan, deadline)
            unsent = self._unsendable(req.body, limit)
            if unsent is not None:
                # Without a reply there is no stream.
                return cast(
                    "bytes | None", self._after(req, rid, t0, plan, deadline, unsent, None, done)
                )

            def replied(result: Reply | str) -> None:
                resp: bytes | CallerStream | None
                try:
                    if plan.simple and result.__class__ is Reply:
                        resp = self._answer(req, rid, t0, plan, result)
                    else:
                        outcome, reply = _received(result)
                        resp = self._after(req, rid, t0, plan, deadline, outcome, reply, done)
                except Exception as exc:
                    resp = self._crashed(req, rid, t0, exc)
                if resp is not None:
                    done(req, resp)

            fast = self.mesh.fast
            assert fast is not None
            if not fast.send_request(plan.subject, hdr, req.body, limit, replied):
                after = self._after(req, rid, t0, plan, deadline, "unavailable", None, done)
                return cast("bytes | None", after)
            return None
        except Exception as exc:
            return self._crashed(req, rid, t0, exc)

    def _answer(
        self, req: Request, rid: str, t0: float, plan: _Plan, reply: Reply
    ) -> bytes | CallerStream:
        """A reply to a plan without retries or breaker: what :meth:`_settle` and
        :meth:`_respond` make of it, in one step for the common case."""
        rh = reply.headers
        status = codec.final_status(rh.get(codec.H_STATUS))
        if status is None or codec.H_ERROR in rh:
            # No valid status (a 502, or a streamed response) or an error code
            # to add the request id for.
            outcome, got = _received(reply)
            step = self._settle(req, rid, plan, 0, outcome, got, 0.0)
            assert not isinstance(step, float)  # no retries in a simple plan
            if isinstance(step, tuple):
                return self._respond(req, rid, t0, step)
            return self._streaming(req, rid, t0, step)
        try:
            block = codec.http_block(rh)[0]
            resp = codec.render_block_response(
                status, block, reply.data, req.keep_alive, req.method == "HEAD"
            )
        except Exception as exc:
            return self._crashed(req, rid, t0, exc, plan.dest_key, plan.rule.name, 1)
        self.inflight -= 1
        self._record(req, rid, t0, status, plan.dest_key, plan.rule.name, 1, "")
        return resp

    def _after(
        self,
        req: Request,
        rid: str,
        t0: float,
        plan: _Plan,
        deadline: float,
        outcome: str | int,
        reply: Reply | None,
        done: Done,
    ) -> bytes | CallerStream | None:
        """The first attempt's outcome: the response, or None if a retry task took over."""
        step = self._settle(req, rid, plan, 0, outcome, reply, deadline)
        if isinstance(step, tuple):
            return self._respond(req, rid, t0, step)
        if not isinstance(step, float):
            return self._streaming(req, rid, t0, step)
        self._later(req, self._retry(req, rid, t0, plan, step, deadline), done)
        return None

    def _later(
        self,
        req: Request,
        coro: Coroutine[Any, Any, bytes | CallerStream],
        done: Done,
    ) -> None:
        def finished(task: asyncio.Task[bytes | CallerStream]) -> None:
            if not task.cancelled():
                done(req, task.result())

        asyncio.get_running_loop().create_task(coro).add_done_callback(finished)

    async def _finish_async(
        self, req: Request, rid: str, t0: float, plan: _Plan | str | None
    ) -> bytes | CallerStream:
        try:
            if req.path.startswith(EVENTS_PREFIX):
                status, headers, body = await self.publish_event(req, rid)
                result: Result | CallerStream = (status, headers, body, "_events", "-", 0, "")
            else:
                result = await self._call(req, rid, plan)
        except Exception as exc:
            return self._crashed(req, rid, t0, exc)
        if isinstance(result, tuple):
            return self._respond(req, rid, t0, result)
        return self._streaming(req, rid, t0, result)

    async def _retry(
        self, req: Request, rid: str, t0: float, plan: _Plan, backoff: float, deadline: float
    ) -> bytes | CallerStream:
        try:
            await asyncio.sleep(backoff)
            result = await self._attempts(req, rid, plan, 1, deadline)
        except Exception as exc:
            return self._crashed(req, rid, t0, exc)
        if isinstance(result, tuple):
            return self._respond(req, rid, t0, result)
        return self._streaming(req, rid, t0, result)

    async def _stream_call(self, req: StreamedRequest, rid: str, t0: float) -> bytes | CallerStream:
        """A request whose body streams: never retried (its body is read once)."""
        try:
            step = await self._prepare(req, rid, None)
            if isinstance(step, tuple):
                result = step
            else:
                answer = await self._streamed(req, rid, step)
                if not isinstance(answer, tuple):
                    return self._streaming(req, rid, t0, answer)
                result = answer
        except Exception as exc:
            req.keep_alive = False
            return self._crashed(req, rid, t0, exc)
        # Answered without reading the body to its end: the connection cannot go on.
        req.keep_alive = False
        return self._respond(req, rid, t0, result)

    async def _streamed(self, req: StreamedRequest, rid: str, plan: _Plan) -> Result | CallerStream:
        from natsmesh_sidecar.transport.stream import protocol

        mesh, rule = self.mesh, plan.rule
        if not protocol.same_namespace(plan.subject):
            s, h, b = self._error(
                413,
                "payload_too_large",
                "request bodies larger than one NATS message do not cross namespaces",
                rid,
            )
            return s, h, b, plan.dest_key, rule.name, 0, "payload_too_large"
        fast = mesh.fast
        reply: Reply | None = None
        streamed: CallerStream | None = None
        if fast is None or mesh.nc is None or not mesh.nc.is_connected:
            outcome: str | int = resilience.UNAVAILABLE
        else:
            # Nm-Stream-Method, not Nm-Method: a callee too old to stream
            # answers 400 rather than call its app with an empty body.
            start = plan.head.replace(b"\r\nNm-Method: ", b"\r\nNm-Stream-Method: ", 1)
            head = b"%sNm-Timeout-Ms: %d\r\n" % (start, rule.timeout_ms)
            answer = await req.stream.start_upload(
                fast, plan.subject, head, rule.timeout_ms / 1000.0
            )
            if isinstance(answer, Reply):
                outcome, reply = _received(answer)
            elif isinstance(answer, str):
                outcome = answer
            else:
                outcome, streamed = STREAMED, answer
                answer.destination, answer.route = plan.dest_key, rule.name
        if outcome in _STREAM_BROKE:
            # The stream broke before a response (an abort, a protocol error).
            if plan.breaker is not None:
                plan.breaker.record(False, time.monotonic())
            s, h, b = self._error(
                502, "stream_failed", f"streamed call to {plan.subject} broke ({outcome})", rid
            )
            return s, h, b, plan.dest_key, rule.name, 1, "stream_failed"
        # The last attempt's number: no retry.
        step = self._settle(
            req, rid, plan, rule.retries.attempts, outcome, reply, 0.0, streamed=streamed
        )
        assert not isinstance(step, float)
        return step

    def _relay(self, req: Request, rid: str, plan: _Plan, reply: Reply) -> Result | CallerStream:
        """A reply that says the response streams: the stream that relays it."""
        from natsmesh_sidecar.transport.stream.caller import CallerStream
        from natsmesh_sidecar.transport.stream.protocol import StreamError

        fast = self.mesh.fast
        try:
            if fast is None:
                raise StreamError("NATS connection lost")
            stream = CallerStream.from_head(
                fast, self.stream_limits, plan.subject, reply, keep_alive=req.keep_alive
            )
        except StreamError as exc:
            s, h, b = self._error(502, "bad_stream", f"{plan.subject} streamed badly: {exc}", rid)
            return s, h, b, plan.dest_key, plan.rule.name, 1, "bad_stream"
        stream.destination, stream.route = plan.dest_key, plan.rule.name
        return stream

    def _streaming(self, req: Request, rid: str, t0: float, stream: CallerStream) -> CallerStream:
        """Count and log a request whose response streams, at its head (the
        access log's duration is the time to the first byte)."""
        self.inflight -= 1
        self._record(req, rid, t0, stream.status, stream.destination, stream.route, 1, "")
        return stream

    def _respond(self, req: Request, rid: str, t0: float, result: Result) -> bytes:
        """Render the response; count and log the request."""
        status, headers, body, dest_key, route, attempts, error = result
        try:
            if error:
                headers.append(("x-request-id", rid))
            resp = codec.render_response(
                status, headers, body, keep_alive=req.keep_alive, head=req.method == "HEAD"
            )
        except Exception as exc:
            return self._crashed(req, rid, t0, exc, dest_key, route, attempts)
        self.inflight -= 1
        self._record(req, rid, t0, status, dest_key, route, attempts, error)
        return resp

    def _crashed(
        self,
        req: Request,
        rid: str,
        t0: float,
        exc: Exception,
        dest_key: str = "-",
        route: str = "-",
        attempts: int = 0,
    ) -> bytes:
        logger.error("outbound request failed", exc_info=exc)
        self.inflight -= 1
        self._record(req, rid, t0, 500, dest_key, route, attempts, "internal")
        return codec.render_response(
            500,
            [("content-type", "application/json"), ("x-request-id", rid)],
            codec.error_body("internal", f"sidecar error: {type(exc).__name__}", rid),
            keep_alive=False,
        )

    def _record(
        self,
        req: Request,
        rid: str,
        t0: float,
        status: int,
        dest_key: str,
        route: str,
        attempts: int,
        error: str,
    ) -> None:
        elapsed = time.perf_counter() - t0
        self.metrics.observe("outbound", self.source, dest_key, status, elapsed)
        tracer = self.tracer
        if tracer is not None:
            tracer.outbound(
                req.traceparent,
                req.special.get("traceparent"),
                elapsed,
                method=req.method,
                path=req.path,
                destination=dest_key,
                route=route,
                status=status,
                error=error,
                attempts=attempts,
                request_id=rid,
            )
        if self.access_log:
            accesslog.log(
                request_id=rid,
                direction="outbound",
                source=self.source,
                destination=dest_key,
                route=route,
                method=req.method,
                path=req.path,
                status=status,
                duration_s=elapsed,
                attempts=attempts,
                error=error,
            )
        tap = self.mesh.tap
        if tap is not None:
            tap.request(
                direction="outbound",
                method=req.method,
                path=req.path,
                status=status,
                duration_s=elapsed,
                source=self.source,
                destination=dest_key,
                request_id=rid,
                route=route,
                error=error,
            )

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        rid: str,
        extra: list[tuple[str, str]] | None = None,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = [("content-type", "application/json")]
        if extra:
            headers.extend(extra)
        return status, headers, codec.error_body(code, message, rid)

    async def _call(
        self, req: Request, rid: str, plan: _Plan | str | None = None
    ) -> Result | CallerStream:
        """(status, headers, body, destination, route, attempts, error code), or a stream."""
        step = await self._prepare(req, rid, plan)
        if isinstance(step, tuple):
            return step
        deadline = time.monotonic() + step.rule.timeout_ms / 1000.0
        return await self._attempts(req, rid, step, 0, deadline)

    async def _prepare(self, req: Request, rid: str, plan: _Plan | str | None) -> Result | _Plan:
        """Route (fetching the policy if need be) and apply the rule's faults."""
        step = self._route(req, rid, MISS) if plan is None else plan
        if isinstance(step, str):
            # A service of our own namespace whose policy is not cached yet.
            dest_key = step
            svc = dest_key.partition(".")[0]
            targets = self.mesh.targets
            assert targets is not None
            try:
                policy = await targets.get(svc)
            except Exception as exc:
                s, h, b = self._error(
                    503, "table_unavailable", f"policy of {dest_key} unreadable: {exc}", rid
                )
                return s, h, b, dest_key, "-", 0, "table_unavailable"
            step = self._route(req, rid, policy)
            assert not isinstance(step, str)
        if isinstance(step, tuple):
            return step
        rule = step.rule
        if step.delay:
            await asyncio.sleep(step.delay)
        if step.abort is not None:
            s, h, b = self._error(
                step.abort, "fault_injected", f"fault injected by route {rule.name}", rid
            )
            return s, h, b, step.dest_key, rule.name, 0, "fault_injected"
        return step

    def _route(self, req: Request, rid: str, policy: object) -> Result | _Plan | str:
        """Resolve, authorise and plan a request; no awaiting.

        A result tuple answers it at once; a string is the destination whose
        policy must be fetched first (then call again with ``policy``).
        """
        mesh = self.mesh
        found, dest_key, dest = mesh.router.resolve(req.host)
        if dest is None and found == UNKNOWN and mesh.targets is not None:
            # A service of our own namespace: its own KV key (see targets.py).
            svc, _, ns = dest_key.partition(".")
            if ns == self.namespace:
                targets = mesh.targets
                if policy is MISS:
                    policy = targets.cached(svc)
                    if policy is MISS:
                        return dest_key
                if isinstance(policy, Target):
                    if policy.admits(self.service):
                        found, dest = FOUND, targets.destinations[svc]
                    else:
                        found = FORBIDDEN
        if dest is None:
            if not req.host:
                s, h, b = self._error(400, "bad_request", "no Host header and no absolute URI", rid)
                return s, h, b, "-", "-", 0, "bad_request"
            if found == FORBIDDEN:
                s, h, b = self._error(
                    403, "forbidden", f"{self.source} may not call {dest_key}", rid
                )
                return s, h, b, dest_key, "-", 0, "forbidden"
            assert found == UNKNOWN
            s, h, b = self._error(404, "unknown_service", f"no service {dest_key} in the mesh", rid)
            return s, h, b, "-", "-", 0, "unknown_service"

        selection = self._selection.get(id(dest))
        if selection is None or selection[0] is not dest:
            selection = self._select(dest)
        sole = selection[2]
        if sole is not None:
            # One rule matching on the path alone: what select_rule decides.
            rule = sole if req.path.startswith(sole.match.path_prefix) else None
        else:
            rule = resilience.select_rule(
                dest.rules,
                req.method,
                req.path,
                req.lower_headers() if selection[1] else req.special,
            )
        if rule is None:
            s, h, b = self._error(
                404, "no_route", f"no route of {dest_key} matches {req.path}", rid
            )
            return s, h, b, dest_key, "-", 0, "no_route"
        weighted = rule.destinations
        if len(weighted) == 1:
            # pick_destination's first case, without drawing a random number.
            target = weighted[0] if weighted[0].weight > 0 else None
        else:
            target = resilience.pick_destination(weighted, self._rand())
        if target is None:
            s, h, b = self._error(
                503, "no_destination", f"route {rule.name} has no weighted destination", rid
            )
            return s, h, b, dest_key, rule.name, 0, "no_destination"
        subject = target.subject + self.caller_suffix
        if not mesh.permissions.can_publish(subject):
            s, h, b = self._error(
                403, "forbidden", f"{self.source} is not permitted to publish to {subject}", rid
            )
            return s, h, b, dest_key, rule.name, 0, "forbidden"
        if len(req.body) > mesh.max_body():
            s, h, b = self._error(
                413, "payload_too_large", "request body exceeds the NATS max_payload", rid
            )
            return s, h, b, dest_key, rule.name, 0, "payload_too_large"

        config = rule.circuit_breaker
        breaker = None if config is None else self.breaker(subject, config)
        if breaker is not None and not breaker.allow(now := time.monotonic()):
            self.metrics.circuit_refused.labels(subject).inc()
            s, h, b = self._error(
                503,
                "circuit_open",
                f"circuit to {subject} is open",
                rid,
                [("retry-after", str(breaker.retry_after(now)))],
            )
            return s, h, b, dest_key, rule.name, 0, "circuit_open"

        delay, abort = 0.0, None
        if rule.fault is not None:
            delay, abort = resilience.fault_decision(rule.fault, self._rand(), self._rand())

        return _Plan(
            dest_key,
            rule,
            subject,
            breaker,
            delay,
            abort,
            _head(req, rid, self.source, self.tracer),
        )

    def _per_try(self, plan: _Plan, deadline: float) -> tuple[float, bytes]:
        """The next attempt's time limit and its NATS header block."""
        remaining = deadline - time.monotonic()
        per_try = remaining
        retries = plan.rule.retries
        if retries.per_try_timeout_ms:
            per_try = min(remaining, retries.per_try_timeout_ms / 1000.0)
        # Nm-Timeout-Ms is the last header: it changes per attempt.
        return per_try, b"%sNm-Timeout-Ms: %d\r\n\r\n" % (plan.head, int(per_try * 1000))

    async def _attempts(
        self, req: Request, rid: str, plan: _Plan, attempt: int, deadline: float
    ) -> Result | CallerStream:
        """Attempts from ``attempt`` on until one settles the request."""
        while True:
            per_try, hdr = self._per_try(plan, deadline)
            sent = self._send(plan.subject, req.body, per_try, hdr)
            outcome, reply = sent if isinstance(sent, tuple) else _received(await sent)
            step = self._settle(req, rid, plan, attempt, outcome, reply, deadline)
            if not isinstance(step, float):
                return step
            attempt += 1
            await asyncio.sleep(step)

    def _settle(
        self,
        req: Request,
        rid: str,
        plan: _Plan,
        attempt: int,
        outcome: str | int,
        reply: Reply | None,
        deadline: float,
        *,
        streamed: object = None,
    ) -> Result | float | CallerStream:
        """An attempt's outcome: the result, or the backoff before the next attempt.

        A streamed response is never retried: its first chunk may already be
        on the client's socket.
        """
        breaker, subject, dest_key, rule = plan.breaker, plan.subject, plan.dest_key, plan.rule
        retries = rule.retries
        if outcome == STREAMED:
            if streamed is None:
                assert reply is not None
                streamed = self._relay(req, rid, plan, reply)
            if isinstance(streamed, tuple):
                outcome = streamed[0]
            else:
                outcome = cast("CallerStream", streamed).status
            if breaker is not None:
                breaker.record(resilience.verdict(outcome), time.monotonic())
            return cast("Result | CallerStream", streamed)
        if (
            outcome not in resilience.CALLER_SIDE
            and attempt < retries.attempts
            and resilience.retryable(outcome, retries, req.method)
        ):
            backoff = resilience.backoff_seconds(attempt, retries, self._rand())
            if time.monotonic() + backoff < deadline:
                self.metrics.retries.labels(dest_key).inc()
                return backoff

        attempts = attempt + 1
        if breaker is not None:
            # Once per request, with its final outcome: a retry that got
            # through is a success, three failed attempts are one failure.
            breaker.record(resilience.verdict(outcome), time.monotonic())
        if outcome == resilience.UNAVAILABLE:
            s, h, b = self._error(
                503,
                "nats_unavailable",
                "NATS connection is down; retry shortly",
                rid,
                [("retry-after", "1")],
            )
            return s, h, b, dest_key, rule.name, attempts, "nats_unavailable"
        if outcome == resilience.VIOLATION:
            # The server refused the publish (its JWT view is narrower than
            # ours was); the sidecar now knows and refuses up front.
            s, h, b = self._error(
                403,
                "permission_violation",
                f"NATS refused {self.source} publishing to {subject}",
                rid,
            )
            return s, h, b, dest_key, rule.name, attempts, "permission_violation"
        if outcome == resilience.TOO_LARGE:
            s, h, b = self._error(
                413, "payload_too_large", "request exceeds the NATS max_payload", rid
            )
            return s, h, b, dest_key, rule.name, attempts, "payload_too_large"
        if outcome == resilience.NO_RESPONDERS:
            s, h, b = self._error(503, "no_responders", f"no instance of {subject} is serving", rid)
            return s, h, b, dest_key, rule.name, attempts, "no_responders"
        if outcome == resilience.TIMEOUT:
            s, h, b = self._error(
                504, "timeout", f"{subject} did not answer within {rule.timeout_ms} ms", rid
            )
            return s, h, b, dest_key, rule.name, attempts, "timeout"
        assert reply is not None
        rh = reply.headers or {}
        status = codec.final_status(rh.get(codec.H_STATUS))
        if status is None:
            # A callee (or anything answering on its subject) that names no
            # final status is a bad gateway, never a 1xx on the app's connection.
            s, h, b = self._error(
                502, "bad_status", f"{subject} answered without a valid status", rid
            )
            return s, h, b, dest_key, rule.name, attempts, "bad_status"
        return (
            status,
            codec.nats_to_http(rh),
            reply.data,
            dest_key,
            rule.name,
            attempts,
            rh.get(codec.H_ERROR, ""),
        )

    def _unsendable(self, body: bytes, limit_s: float) -> str | None:
        """Why a NATS request cannot be sent now, or None."""
        nc = self.mesh.nc
        if nc is None or self.mesh.fast is None or not nc.is_connected:
            return "unavailable"
        if limit_s <= 0:
            return resilience.TIMEOUT
        if len(body) > nc.max_payload:
            return "too_large"
        return None

    def _send(
        self, subject: str, body: bytes, limit_s: float, hdrs: bytes
    ) -> tuple[str | int, Reply | None] | asyncio.Future[Reply | str]:
        """One NATS request: its future, or the outcome when it cannot be sent."""
        unsent = self._unsendable(body, limit_s)
        if unsent is not None:
            return unsent, None
        fast = self.mesh.fast
        assert fast is not None
        return fast.request(subject, hdrs, body, limit_s)


def _head(req: Request, rid: str, source: str, tracer: Tracer | None) -> bytes:
    """The request's NATS header block, less Nm-Timeout-Ms and the blank line.

    The app's headers (:func:`codec.nats_lines`), then the mesh's and the two
    the parser kept aside (the app still needs them): what
    ``natsfast.encode_headers`` writes for the dict of all of them, built
    as text at once.
    """
    special = req.special
    incoming = special.get("traceparent")
    tp = req.traceparent = (
        codec.next_traceparent(incoming) if tracer is None else tracer.next_traceparent(incoming)
    )
    mesh = (
        f"Nm-Method: {req.method}\r\nNm-Target: {req.target}\r\nNm-Source: {source}\r\n"
        f"X-Request-Id: {rid}\r\ntraceparent: {tp}\r\n"
    )
    lines = 5
    ct = special.get("content-type")
    if ct is not None:
        mesh += f"content-type: {ct}\r\n"
        lines += 1
    key = special.get("idempotency-key")
    if key is not None:
        mesh += f"idempotency-key: {key}\r\n"
        lines += 1
    if mesh.count("\n") != lines or mesh.count("\r") != lines:
        # A value held CR or LF: blanked, as encode_headers does.
        pairs = [
            (codec.H_METHOD, req.method),
            (codec.H_TARGET, req.target),
            (codec.H_SOURCE, source),
            (codec.REQUEST_ID, rid),
            (codec.TRACEPARENT, tp),
            ("content-type", ct),
            ("idempotency-key", key),
        ]
        mesh = "".join(f"{k}: {v.translate(_NEWLINES)}\r\n" for k, v in pairs if v is not None)
    return f"NATS/1.0\r\n{codec.nats_lines(req.headers)}{mesh}".encode()


def _received(reply: Reply | str) -> tuple[str | int, Reply | None]:
    if isinstance(reply, str):
        # TIMEOUT and NO_RESPONDERS are resilience's names too.
        return reply, None
    status = codec.final_status(reply.headers.get(codec.H_STATUS)) or 502
    if status == 502:
        if codec.H_UNDELIVERED in reply.headers:
            # The callee's app refused the connection (it is starting or dying):
            # like no responders, safe to try another replica.
            return resilience.UNDELIVERED, reply
        if codec.H_STREAM in reply.headers and codec.H_STATUS not in reply.headers:
            return STREAMED, reply
    return status, reply
