"""Our JWT encoder/decoder, keys and creds format."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natsmesh_operator.wiring import jwt
from natsmesh_operator.wiring.keys import Key, KeyRing, NKeyError, Role, decode_public, verify

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("role", list(Role))
def test_key_roles_and_prefixes(role: Role) -> None:
    key = Key.create(role)
    assert key.public.startswith(role.letter)
    assert key.seed.startswith("S" + role.letter)
    assert Key.from_seed(key.seed, role) == key
    assert decode_public(key.public)[0] is role
    assert key.seed not in repr(key)


def test_seed_of_the_wrong_role_is_refused() -> None:
    with pytest.raises(NKeyError, match="account key, wanted user"):
        Key.from_seed(Key.create(Role.ACCOUNT).seed, Role.USER)
    with pytest.raises(NKeyError):
        Key.from_seed("SUNOTASEED")


def test_bad_public_key_checksum_is_refused() -> None:
    public = Key.create(Role.USER).public
    broken = public[:-1] + ("A" if public[-1] != "A" else "B")
    with pytest.raises(NKeyError):
        decode_public(broken)


def test_encode_decode_round_trip_and_header() -> None:
    account = Key.create(Role.ACCOUNT)
    token = jwt.encode({"sub": "UX", "name": "n", "nats": {"type": "user"}}, account, issued_at=5)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"typ": "JWT", "alg": "ed25519-nkey"}
    assert "=" not in token
    decoded = jwt.decode(token)
    assert decoded.issuer == account.public
    assert decoded.claims["iat"] == 5
    assert decoded.nats == {"type": "user"}
    assert jwt.encode(
        {"sub": "UX", "name": "n", "nats": {"type": "user"}}, account, issued_at=5
    ) == (token), "same claims, same token: jti is a content hash"


def test_tampered_token_does_not_verify() -> None:
    account = Key.create(Role.ACCOUNT)
    token = jwt.encode({"sub": "UX", "nats": {"pub": {"allow": ["a"]}}}, account)
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["nats"]["pub"]["allow"] = [">"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(jwt.JwtError, match="signature"):
        jwt.decode(f"{head}.{forged}.{sig}")
    other = Key.create(Role.ACCOUNT)
    resigned = jwt.encode(jwt.decode(token).claims, other)
    assert jwt.decode(resigned).issuer == other.public
    assert not verify(account.public, b"x", other.sign(b"x"))


@pytest.mark.parametrize("bad", ["", "a.b", "a.b.c.d", "!!.??.##"])
def test_garbage_is_a_jwt_error(bad: str) -> None:
    with pytest.raises(jwt.JwtError):
        jwt.decode(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(nats_claims=st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=6))
def test_round_trip_any_claims(nats_claims: dict[str, object]) -> None:
    key = Key.create(Role.OPERATOR)
    claims = {"sub": key.public, "nats": nats_claims}
    decoded = jwt.decode(jwt.encode(claims, key))
    assert decoded.nats == nats_claims
    assert jwt.same_content(jwt.encode(claims, key, issued_at=1), claims, key.public)


def test_same_content_ignores_iat_and_jti_only() -> None:
    key = Key.create(Role.OPERATOR)
    claims = {"sub": "A", "name": "shop", "nats": {"limits": {"conn": -1}}}
    token = jwt.encode(claims, key, issued_at=1)
    assert jwt.same_content(token, claims, key.public)
    assert not jwt.same_content(token, {**claims, "name": "other"}, key.public)
    assert not jwt.same_content(token, claims, Key.create(Role.OPERATOR).public)


def test_creds_body_is_exactly_nscs() -> None:
    body = jwt.creds("eyJ.x.y", "SUABC")
    assert body == (
        "-----BEGIN NATS USER JWT-----\neyJ.x.y\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\nSUABC\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )
    assert jwt.parse_creds(body) == ("eyJ.x.y", "SUABC")


def test_keyring_is_stable_and_persistable() -> None:
    ring = KeyRing()
    a = ring.account("shop")
    u = ring.user("shop", "orders")
    again = KeyRing(ring.dump())
    assert again.account("shop") == a
    assert again.user("shop", "orders") == u
    old, new = again.rotate_user("shop", "orders")
    assert old == u
    assert new != u
    assert again.user("shop", "orders") == new
