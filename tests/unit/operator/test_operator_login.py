"""kopf's API session: bounded connections when watching the whole cluster."""

from __future__ import annotations

import kopf

from natsmesh_operator.main import ApiLogin, api_connection_limit, bounded_session
from natsmesh_operator.settings import OperatorSettings


def test_bounded_cluster_wide_unbounded_with_namespace_globs() -> None:
    assert api_connection_limit(OperatorSettings.from_env({})) == 32
    assert api_connection_limit(OperatorSettings.from_env({"NATSMESH_API_CONNECTIONS": "8"})) == 8
    assert api_connection_limit(OperatorSettings.from_env({"NATSMESH_API_CONNECTIONS": "0"})) == 0
    # One long watch per namespace and kind: a fixed pool could be filled by them.
    scoped = OperatorSettings.from_env({"NATSMESH_WATCH_NAMESPACES": "shop-*"})
    assert api_connection_limit(scoped) == 0


async def test_bounded_session_keeps_the_credentials() -> None:
    info = kopf.ConnectionInfo(
        server="https://127.0.0.1:6443",
        token="t0ken",
        insecure=True,
        default_namespace="natsmesh-system",
    )
    ctx = bounded_session(info, 5)
    try:
        assert ctx.server == info.server
        assert ctx.default_namespace == "natsmesh-system"
        session = ctx.aiohttp_session
        assert session.connector is not None
        assert session.connector.limit == 5
        assert session.headers["Authorization"] == "Bearer t0ken"
    finally:
        await ctx.aiohttp_session.close()


def info(token: str) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server="https://127.0.0.1:6443", token=token, insecure=True)


async def test_the_same_token_gets_the_same_session_so_kopf_can_tell_it_failed() -> None:
    """kopf drops credentials equal to ones that just got a 401; a fresh
    session per login made them look new and re-login spin forever."""
    refusals: list[str] = []
    login = ApiLogin(5)
    first = login.login(info("t0ken"), lambda: refusals.append("t0ken"))
    assert refusals == []
    # kopf asks again only after a 401 for every credential it holds.
    again = login.login(info("t0ken"), lambda: refusals.append("t0ken"))
    assert refusals == ["t0ken"]
    rotated = login.login(info("r0tated"), lambda: refusals.append("r0tated"))
    assert refusals == ["t0ken"]
    assert isinstance(first, kopf.AiohttpSession)
    assert isinstance(rotated, kopf.AiohttpSession)
    try:
        assert again is first
        assert rotated != first
        assert rotated.aiohttp_session.headers["Authorization"] == "Bearer r0tated"
    finally:
        await first.aiohttp_session.close()
        await rotated.aiohttp_session.close()


def test_unbounded_logins_hand_kopf_the_credentials_and_stop_on_a_refusal() -> None:
    refusals: list[str] = []
    login = ApiLogin(0)
    assert login.login(None, lambda: refusals.append("none")) is None
    assert login.login(info("t0ken"), lambda: refusals.append("t0ken")) == info("t0ken")
    assert login.login(info("r0tated"), lambda: refusals.append("r0tated")) == info("r0tated")
    assert login.login(info("r0tated"), lambda: refusals.append("again")) == info("r0tated")
    assert refusals == ["again"]
