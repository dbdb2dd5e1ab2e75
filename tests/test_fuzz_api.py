"""Bad input: a schemathesis property-based fuzz of every endpoint of the OpenAPI schema (no 5xx,
no hang, only documented statuses), then explicit hostile inputs, each answered with the
documented 4xx and a message naming what is wrong.

The fuzz talks to the real app over loopback HTTP (tiny real model, so tokenizer edge cases are
exercised); examples per operation are bounded so the run takes about a minute on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import loopback
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from gpm_server.app import create_app
from gpm_server.settings import Settings

EXAMPLES = 25  # per operation and generation mode
LIMITS = {
    "max_body_bytes": 64 * 1024,
    "max_groups_per_request": 4,
    "max_responses_per_group": 8,
    "max_pairs_per_request": 4,
    "max_length": 64,
}


@pytest.fixture(scope="module")
def live(tiny_gpm, tmp_path_factory):
    """(app, base URL) of the service on the tiny model with small limits."""
    db = tmp_path_factory.mktemp("fuzz") / "t.sqlite3"
    app = create_app(Settings(telemetry_db=db, **LIMITS), model=tiny_gpm)
    with loopback.serve(app, ready=True) as url:
        yield app, url


# The schema comes from an app that is never started (the OpenAPI document does not depend on
# the model); the cases are sent to `live`, the started one with the same settings.
schema = schemathesis.openapi.from_dict(
    create_app(Settings(telemetry_db=Path(":memory:"), **LIMITS)).openapi()
)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # reproducible in CI; a failure prints the exact request
    suppress_health_check=list(HealthCheck),
)
def test_fuzz_every_endpoint(case, live) -> None:
    response = case.call(base_url=live[1], timeout=30)  # a hang fails here
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
        ],
    )


# --- explicit hostile inputs ------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
GROUP = {"prompt": "p", "responses": ["a", "b"]}


def _raw(text: str) -> bytes:
    return text.encode()


CASES = [
    # (name, path, body (dict or raw bytes), status, code, field or None, words in the message)
    (
        "empty prompt",
        "/score",
        {"groups": [{**GROUP, "prompt": ""}]},
        422,
        "invalid_request",
        "groups.0.prompt",
        "at least 1",
    ),
    ("empty body", "/score", b"", 422, "invalid_request", "body", "required"),
    ("empty object", "/compare", {}, 422, "invalid_request", "body", "pairs"),
    (
        "huge response over the body limit",
        "/score",
        {"groups": [{**GROUP, "responses": ["x" * 70_000]}]},
        413,
        "body_too_large",
        "body",
        "limit",
    ),
    (
        "thousands of responses",
        "/score",
        {"groups": [{**GROUP, "responses": ["r"] * 3000}]},
        413,
        "too_large",
        "groups.0.responses",
        "3000",
    ),
    (
        "thousands of groups",
        "/score",
        {"groups": [GROUP] * 1000},
        413,
        "too_large",
        "groups",
        "1000",
    ),
    (
        "thousands of pairs",
        "/compare",
        {"pairs": [{"prompt": "p", "a": "a", "b": "b"}] * 1000},
        413,
        "too_large",
        "pairs",
        "1000",
    ),
    (
        "invalid UTF-8 bytes",
        "/score",
        b'{"groups": [{"prompt": "\xff\xfe\xc3", "responses": ["a"]}]}',
        422,
        "invalid_json",
        None,
        "UTF-8",
    ),
    (
        "lone surrogate in a response",
        "/score",
        _raw('{"groups": [{"prompt": "p", "responses": ["ok", "\\udc80"]}]}'),
        422,
        None,
        "groups.0.responses.1",
        "unicode",
    ),
    (
        "lone surrogate in a compare text",
        "/compare",
        _raw('{"prompt": "p", "a": "\\ud800", "b": "b"}'),
        422,
        "invalid_text",
        "a",
        "surrogate",
    ),
    (
        "lone surrogate in a chat message",
        "/compare",
        _raw(
            '{"pairs": [{"prompt": [{"role": "user", "content": "\\ud800"}], "a": "x", "b": "y"}]}'
        ),
        422,
        None,
        "pairs.0.prompt",
        "unicode",
    ),
    (
        "lone surrogate in an OpenRLHF query",
        "/openrlhf/reward",
        _raw('{"query": ["hi \\udfff"]}'),
        422,
        "invalid_text",
        "query.0",
        "surrogate",
    ),
    (
        "wrong type: top-level array",
        "/score",
        [GROUP],
        422,
        "invalid_request",
        "body",
        "dictionary",
    ),
    (
        "wrong type: responses a string",
        "/score",
        {"groups": [{**GROUP, "responses": "ab"}]},
        422,
        "invalid_request",
        "groups.0.responses",
        "list",
    ),
    (
        "wrong type: return_matrix",
        "/score",
        {"groups": [GROUP], "return_matrix": [1]},
        422,
        "invalid_request",
        "return_matrix",
        "boolean",
    ),
    (
        "wrong type: query a string",
        "/openrlhf/reward",
        {"query": "q"},
        422,
        "invalid_request",
        "query",
        "list",
    ),
    (
        "Infinity as a step",
        "/score",
        _raw('{"groups": [{"prompt": "p", "responses": ["a"]}], "run_id": "r", "step": Infinity}'),
        422,
        "invalid_request",
        "step",
        "finite",
    ),
    (
        "-Infinity as a response",
        "/score",
        _raw('{"groups": [{"prompt": "p", "responses": [-Infinity]}]}'),
        422,
        "invalid_request",
        "groups.0.responses.0",
        "string",
    ),
    (
        "step beyond 64 bits",
        "/score",
        {"groups": [GROUP], "run_id": "r", "step": 2**64},
        422,
        "invalid_request",
        "step",
        "less than",
    ),
    (
        "deeply nested JSON",
        "/score",
        b'{"groups": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",
        422,
        "invalid_json",
        None,
        "deeply",
    ),
    (
        "nested lists as a prompt",
        "/score",
        {"groups": [{**GROUP, "prompt": [[[[["p"]]]]]}]},
        422,
        "invalid_request",
        "groups.0.prompt.0",
        "dictionary",
    ),
    (
        "chat message without content",
        "/score",
        {"groups": [{**GROUP, "prompt": [{"role": "user"}]}]},
        422,
        "invalid_request",
        "groups.0.prompt.0.content",
        "required",
    ),
    (
        "chat message without role",
        "/score",
        {"groups": [{**GROUP, "prompt": [{"content": "hi"}]}]},
        422,
        "invalid_request",
        "groups.0.prompt.0.role",
        "required",
    ),
    (
        "chat message with an unknown key",
        "/score",
        {"groups": [{**GROUP, "prompt": [{"role": "user", "content": "hi", "name": "x"}]}]},
        422,
        "invalid_request",
        "groups.0.prompt.0.name",
        "not permitted",
    ),
    (
        "chat message content not text",
        "/compare",
        {"prompt": [{"role": "user", "content": {"text": "hi"}}], "a": "x", "b": "y"},
        422,
        "invalid_request",
        "prompt.0.content",
        "string",
    ),
    (
        "chat message as a bare string in the list",
        "/score",
        {"groups": [{**GROUP, "prompt": ["hi"]}]},
        422,
        "invalid_request",
        "groups.0.prompt.0",
        "dictionary",
    ),
    (
        "tool role",
        "/score",
        {"groups": [{**GROUP, "prompt": [{"role": "tool", "content": "x"}]}]},
        422,
        "invalid_request",
        "groups.0.prompt.0.role",
        "assistant",
    ),
    ("not JSON at all", "/score", b"groups=1&prompt=2", 422, "invalid_json", None, "JSON"),
    (
        "OpenRLHF label message without a role",
        "/openrlhf/reward",
        {"query": ["hi"], "labels": [{"messages": [{"content": "x"}]}]},
        422,
        "bad_label",
        "labels.0",
        "role",
    ),
    (
        "OpenRLHF label (JSON text) message without content",
        "/get_reward",
        {"query": ["hi"], "labels": ['{"messages": [{"role": "user"}]}']},
        422,
        "bad_label",
        "labels.0",
        "content",
    ),
    (
        "OpenRLHF reference with a lone surrogate",
        "/get_reward",
        {"query": ["hi"], "labels": ['{"reference": "\\ud800"}']},
        422,
        "invalid_text",
        "labels.0.reference",
        "surrogate",
    ),
    (
        "OpenRLHF prompts of the wrong length",
        "/get_reward",
        {"query": ["hi"], "prompts": ["a", "b"]},
        422,
        "length_mismatch",
        None,
        "lengths",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "field", "words"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_hostile_input_gets_the_documented_4xx(live, path, body, status, code, field, words):
    app, url = live
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(url + path, content=content, headers=JSON, timeout=60)
    assert resp.status_code == status, resp.text
    documented = app.openapi()["paths"][path]["post"]["responses"]
    assert str(status) in documented
    err = resp.json()["error"]
    if code is not None:
        assert err["code"] == code
    assert err.get("field") == field
    assert words.lower() in err["message"].lower(), err["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"groups": [{"prompt": "p", "responses": ["", ""]}]},  # empty responses are scorable
        {"groups": [{"prompt": "p\x00", "responses": ["\x00", "a\x00b"]}]},  # NUL characters
        {"groups": [{"prompt": "p", "responses": ["word " * 5000, "short"]}]},  # huge: truncated
        {"groups": [{"prompt": "🙂 ünïcødé", "responses": ["😀" * 5, "\u202e\u200b"]}]},
    ],
    ids=["empty responses", "NUL characters", "huge string truncated", "astral and control"],
)
def test_odd_but_valid_text_is_scored(live, body) -> None:
    resp = httpx.post(live[1] + "/score", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    group = resp.json()["groups"][0]
    assert all(r is not None for r in group["rewards"])
    if len(body["groups"][0]["responses"][0]) > 1000:
        assert group["truncated"][0]


def test_oversized_bodies_on_every_post_route(live) -> None:
    app, url = live
    posts = [p for p, item in app.openapi()["paths"].items() if "post" in item]
    assert len(posts) >= 4
    for path in posts:
        big = b'{"x": "' + b"y" * (LIMITS["max_body_bytes"] + 1) + b'"}'
        resp = httpx.post(url + path, content=big, headers=JSON, timeout=60)
        assert resp.status_code == 413, path
        assert resp.json()["error"]["code"] == "body_too_large"
