"""Outbound: the app's HTTP calls (parsed by natsmesh_sidecar.edge.listener) become NATS requests.

:class:`OutboundHandler` turns one parsed request into a response: plan it
(natsmesh_sidecar.calls.route: destination, rule, permissions, breaker,
faults), send it within the rule's timeout, settle each attempt's outcome
(retry, or the answer), and map the reply back. The steps, in order:

* :meth:`~OutboundHandler.start`: the connection's entry; events, streamed
  bodies, policy fetches and fault delays continue in a task, the rest is
  sent at once and answered from the reply's callback;
* :meth:`~OutboundHandler._settle`: an attempt's outcome becomes the
  result, a backoff before the next attempt, or a stream;
* :meth:`~OutboundHandler._respond` / :meth:`~OutboundHandler._streaming`:
  the response, counted, logged, traced and tapped (:meth:`~OutboundHandler._record`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from natsmesh_sidecar import codec
from natsmesh_sidecar.calls.route import Mesh, Plan, Planner, Result, body_limit, refusal
from natsmesh_sidecar.edge.listener import EVENTS_PREFIX
from natsmesh_sidecar.edge.request import Done, Request, StreamedRequest
from natsmesh_sidecar.observe import accesslog
from natsmesh_sidecar.policy import resilience
from natsmesh_sidecar.transport.natsfast import Reply
from natsmesh_sidecar.wire import Rule, StreamLimits

if TYPE_CHECKING:
    from natsmesh_sidecar.observe.metrics import Metrics
    from natsmesh_sidecar.observe.tracing import Tracer
    from natsmesh_sidecar.transport.stream.caller import CallerStream

logger = logging.getLogger(__name__)

#: The outcome of a reply that says the response streams (natsmesh_sidecar.transport.stream).
STREAMED = "streamed"
#: A streamed request body outgrew its rule's ``max_body_bytes``
#: (natsmesh_sidecar.transport.stream.caller.CallerStream.feed).
BODY_LIMIT = "body_limit"
#: Outcomes of an upload whose stream broke before any response.
_STREAM_BROKE = frozenset({"aborted", "bad_stream", "cut", "bad_subject"})
#: An event's publish (natsmesh_sidecar.events.publisher): (status, headers, body).
PublishEvent = Callable[[Request, str], Awaitable[tuple[int, list[tuple[str, str]], bytes]]]


class OutboundHandler:
    """Turns one request into one response; never raises.

    :meth:`start` is the connection's entry: a request that needs nothing
    but one NATS request (no policy fetch, no fault delay, no retry) is
    answered from callbacks, without a task or a coroutine chain; anything
    else continues in a task running the same steps (:meth:`_finish_async`).

    Takes what it uses: ``mesh`` for the state that changes while the sidecar
    runs, the ``planner`` that routes, the rest fixed at start.
    """

    def __init__(
        self,
        mesh: Mesh,
        planner: Planner,
        *,
        metrics: Metrics,
        publish_event: PublishEvent,
        stream_limits: StreamLimits,
        tracer: Tracer | None = None,
        access_log: bool = True,
    ) -> None:
        self.mesh = mesh
        self.planner = planner
        #: Bound once: called per request.
        self._plan = planner.plan
        #: Who we are in labels and logs (``<service>.<namespace>``).
        self.source = planner.source
        self.metrics = metrics
        self.publish_event = publish_event
        self.stream_limits = stream_limits
        #: Set only with an OTLP endpoint (natsmesh_sidecar.observe.tracing).
        self.tracer = tracer
        self.access_log = access_log
        self._rand = random.random
        self.inflight = 0

    # -- the entry ------------------------------------------------------------

    def tunnel_refusal(self, authority: str) -> tuple[int, str, str] | None:
        """(status, code, message) refusing a CONNECT to ``authority``; None to open it."""
        return self.planner.tunnel_refusal(authority)

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
            step = self._plan(req, rid)
            if step.__class__ is not Plan:
                if isinstance(step, tuple):
                    return self._respond(req, rid, t0, step)
                # A target whose policy is not cached yet.
                self._later(req, self._finish_async(req, rid, t0, step), done)
                return None
            plan = step
            if plan.delay or plan.abort is not None:
                self._later(req, self._finish_async(req, rid, t0, plan), done)
                return None
            # The first attempt, answered from the reply's callback (a retry
            # goes on in a task). Inline, not a method of its own: this is
            # every request's path.
            deadline = time.monotonic() + plan.rule.timeout_ms / 1000.0
            limit, hdr = self._per_try(plan, deadline)
            unsent = self._unsendable(req.body, limit)
            if unsent is not None:
                # Without a reply there is no stream.
                after = self._after(req, rid, t0, plan, deadline, unsent, None, done)
                return cast("bytes | None", after)

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
        self, req: Request, rid: str, t0: float, plan: Plan, reply: Reply
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
            return self._finish(req, rid, t0, step)
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
        plan: Plan,
        deadline: float,
        outcome: str | int,
        reply: Reply | None,
        done: Done,
    ) -> bytes | CallerStream | None:
        """The first attempt's outcome: the response, or None if a retry task took over."""
        step = self._settle(req, rid, plan, 0, outcome, reply, deadline)
        if isinstance(step, float):
            self._later(req, self._retry(req, rid, t0, plan, step, deadline), done)
            return None
        return self._finish(req, rid, t0, step)

    # -- what continues in a task --------------------------------------------------

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
        self, req: Request, rid: str, t0: float, plan: Plan | str | None
    ) -> bytes | CallerStream:
        try:
            if req.path.startswith(EVENTS_PREFIX):
                status, headers, body = await self.publish_event(req, rid)
                result: Result | CallerStream = (status, headers, body, "_events", "-", 0, "")
            else:
                result = await self._call(req, rid, plan)
        except Exception as exc:
            return self._crashed(req, rid, t0, exc)
        return self._finish(req, rid, t0, result)

    async def _retry(
        self, req: Request, rid: str, t0: float, plan: Plan, backoff: float, deadline: float
    ) -> bytes | CallerStream:
        try:
            await asyncio.sleep(backoff)
            result = await self._attempts(req, rid, plan, 1, deadline)
        except Exception as exc:
            return self._crashed(req, rid, t0, exc)
        return self._finish(req, rid, t0, result)

    async def _call(
        self, req: Request, rid: str, plan: Plan | str | None = None
    ) -> Result | CallerStream:
        """(status, headers, body, destination, route, attempts, error code), or a stream."""
        step = await self._prepare(req, rid, plan)
        if isinstance(step, tuple):
            return step
        deadline = time.monotonic() + step.rule.timeout_ms / 1000.0
        return await self._attempts(req, rid, step, 0, deadline)

    async def _prepare(self, req: Request, rid: str, plan: Plan | str | None) -> Result | Plan:
        """Plan (fetching the target's policy if need be) and apply the rule's faults."""
        step = self._plan(req, rid) if plan is None else plan
        if isinstance(step, str):
            step = await self._plan_fetched(req, rid, step)
        if isinstance(step, tuple):
            return step
        rule = step.rule
        if step.delay:
            await asyncio.sleep(step.delay)
        if step.abort is not None:
            return refusal(
                step.abort,
                "fault_injected",
                f"fault injected by route {rule.name}",
                rid,
                step.dest_key,
                rule.name,
            )
        return step

    async def _plan_fetched(self, req: Request, rid: str, dest_key: str) -> Result | Plan:
        """Plan a call to a service of our own namespace whose policy is not cached yet."""
        svc = dest_key.partition(".")[0]
        targets = self.mesh.targets
        assert targets is not None
        try:
            policy = await targets.get(svc)
        except Exception as exc:
            return refusal(
                503, "table_unavailable", f"policy of {dest_key} unreadable: {exc}", rid, dest_key
            )
        step = self._plan(req, rid, policy)
        assert not isinstance(step, str)
        return step

    async def _attempts(
        self, req: Request, rid: str, plan: Plan, attempt: int, deadline: float
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

    # -- streamed bodies ---------------------------------------------------------------

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

    async def _streamed(self, req: StreamedRequest, rid: str, plan: Plan) -> Result | CallerStream:
        mesh, rule = self.mesh, plan.rule
        if req.stream.limit_body(rule.max_body_bytes):
            return body_limit(rule, rid, plan.dest_key)
        req.stream.limits = self._limits(rule)
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
        if outcome == BODY_LIMIT:
            # A chunked body outgrew the rule's limit on its way: the callee was told.
            return body_limit(rule, rid, plan.dest_key, 1)
        if outcome in _STREAM_BROKE:
            # The stream broke before a response (an abort, a protocol error).
            if plan.breaker is not None:
                plan.breaker.record(False, time.monotonic())
            return refusal(
                502,
                "stream_failed",
                f"streamed call to {plan.subject} broke ({outcome})",
                rid,
                plan.dest_key,
                rule.name,
                1,
            )
        # The last attempt's number: no retry.
        step = self._settle(
            req, rid, plan, rule.retries.attempts, outcome, reply, 0.0, streamed=streamed
        )
        assert not isinstance(step, float)
        return step

    def _relay(self, req: Request, rid: str, plan: Plan, reply: Reply) -> Result | CallerStream:
        """A reply that says the response streams: the stream that relays it."""
        from natsmesh_sidecar.transport.stream.caller import CallerStream
        from natsmesh_sidecar.transport.stream.protocol import StreamError

        fast = self.mesh.fast
        try:
            if fast is None:
                raise StreamError("NATS connection lost")
            stream = CallerStream.from_head(
                fast, self._limits(plan.rule), plan.subject, reply, keep_alive=req.keep_alive
            )
        except StreamError as exc:
            return refusal(
                502,
                "bad_stream",
                f"{plan.subject} streamed badly: {exc}",
                rid,
                plan.dest_key,
                plan.rule.name,
                1,
            )
        stream.destination, stream.route = plan.dest_key, plan.rule.name
        return stream

    def _limits(self, rule: Rule) -> StreamLimits:
        """The stream limits of a call by ``rule``: its ``stream`` settings, else the sidecar's."""
        base, policy = self.stream_limits, rule.stream
        if policy is None:
            return base
        return StreamLimits(
            chunk_bytes=base.chunk_bytes,
            window=policy.window or base.window,
            idle_timeout_s=policy.idle_timeout_ms / 1000.0 or base.idle_timeout_s,
        )

    # -- settling an attempt -------------------------------------------------------------

    def _settle(
        self,
        req: Request,
        rid: str,
        plan: Plan,
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
        if outcome == STREAMED:
            return self._settle_streamed(req, rid, plan, reply, streamed)
        if outcome not in resilience.CALLER_SIDE and attempt < plan.rule.retries.attempts:
            backoff = self._backoff(req, plan, attempt, outcome, deadline)
            if backoff is not None:
                return backoff
        breaker = plan.breaker
        if breaker is not None:
            # Once per request, with its final outcome: a retry that got
            # through is a success, three failed attempts are one failure.
            breaker.record(resilience.verdict(outcome), time.monotonic())
        failed = self._failure(rid, plan, attempt + 1, outcome)
        if failed is not None:
            return failed
        assert reply is not None
        return self._from_reply(rid, plan, attempt + 1, reply)

    def _settle_streamed(
        self, req: Request, rid: str, plan: Plan, reply: Reply | None, streamed: object
    ) -> Result | CallerStream:
        """A response that streams: its stream (made from the reply's head if
        not made yet), the breaker told of its status."""
        if streamed is None:
            assert reply is not None
            streamed = self._relay(req, rid, plan, reply)
        if isinstance(streamed, tuple):
            outcome = streamed[0]
        else:
            outcome = cast("CallerStream", streamed).status
        if plan.breaker is not None:
            plan.breaker.record(resilience.verdict(outcome), time.monotonic())
        return cast("Result | CallerStream", streamed)

    def _backoff(
        self, req: Request, plan: Plan, attempt: int, outcome: str | int, deadline: float
    ) -> float | None:
        """Seconds before the next attempt, or None if this outcome is final."""
        retries = plan.rule.retries
        if not resilience.retryable(outcome, retries, req.method):
            return None
        backoff = resilience.backoff_seconds(attempt, retries, self._rand())
        if time.monotonic() + backoff >= deadline:
            return None
        self.metrics.retries.labels(plan.dest_key).inc()
        return backoff

    def _failure(self, rid: str, plan: Plan, attempts: int, outcome: str | int) -> Result | None:
        """The answer to an outcome without a reply to relay, else None."""
        subject, dest_key, route = plan.subject, plan.dest_key, plan.rule.name
        if outcome == resilience.UNAVAILABLE:
            return refusal(
                503,
                "nats_unavailable",
                "NATS connection is down; retry shortly",
                rid,
                dest_key,
                route,
                attempts,
                [("retry-after", "1")],
            )
        if outcome == resilience.VIOLATION:
            # The server refused the publish (its JWT view is narrower than
            # ours was); the sidecar now knows and refuses up front.
            message = f"NATS refused {self.source} publishing to {subject}"
            return refusal(403, "permission_violation", message, rid, dest_key, route, attempts)
        if outcome == resilience.TOO_LARGE:
            message = "request exceeds the NATS max_payload"
            return refusal(413, "payload_too_large", message, rid, dest_key, route, attempts)
        if outcome == resilience.NO_RESPONDERS:
            message = f"no instance of {subject} is serving"
            return refusal(503, "no_responders", message, rid, dest_key, route, attempts)
        if outcome == resilience.TIMEOUT:
            message = f"{subject} did not answer within {plan.rule.timeout_ms} ms"
            return refusal(504, "timeout", message, rid, dest_key, route, attempts)
        if outcome == resilience.CANCELLED:
            # Nobody reads it: for the access log and metrics (nginx's 499).
            message = "the client cancelled the call"
            return refusal(499, "client_closed", message, rid, dest_key, route, attempts)
        return None

    def _from_reply(self, rid: str, plan: Plan, attempts: int, reply: Reply) -> Result:
        """The callee's answer as the result."""
        rh = reply.headers or {}
        status = codec.final_status(rh.get(codec.H_STATUS))
        if status is None:
            # A callee (or anything answering on its subject) that names no
            # final status is a bad gateway, never a 1xx on the app's connection.
            message = f"{plan.subject} answered without a valid status"
            return refusal(502, "bad_status", message, rid, plan.dest_key, plan.rule.name, attempts)
        return (
            status,
            codec.nats_to_http(rh),
            reply.data,
            plan.dest_key,
            plan.rule.name,
            attempts,
            rh.get(codec.H_ERROR, ""),
        )

    # -- NATS ---------------------------------------------------------------------------

    def _per_try(self, plan: Plan, deadline: float) -> tuple[float, bytes]:
        """The next attempt's time limit and its NATS header block."""
        remaining = deadline - time.monotonic()
        per_try = remaining
        retries = plan.rule.retries
        if retries.per_try_timeout_ms:
            per_try = min(remaining, retries.per_try_timeout_ms / 1000.0)
        # Nm-Timeout-Ms is the last header: it changes per attempt.
        return per_try, b"%sNm-Timeout-Ms: %d\r\n\r\n" % (plan.head, int(per_try * 1000))

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

    # -- the answer -----------------------------------------------------------------------

    def _finish(
        self, req: Request, rid: str, t0: float, result: Result | CallerStream
    ) -> bytes | CallerStream:
        """The response of a settled request: rendered, or its stream."""
        if isinstance(result, tuple):
            return self._respond(req, rid, t0, result)
        return self._streaming(req, rid, t0, result)

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
