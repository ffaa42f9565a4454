"""capsule serve over streamable HTTP, driven by the official Python MCP SDK."""

import json
import subprocess
import urllib.error
import urllib.request

import anyio
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from conftest import HttpServer, capsule_bin, free_port, server_env

TOKEN = "py-test-token-0123456789abcdef"


@pytest.fixture
def server(state_dir):
    s = HttpServer(state_dir)
    yield s
    s.stop()


@pytest.fixture
def token_server(state_dir):
    s = HttpServer(state_dir, token=TOKEN)
    yield s
    s.stop()


async def with_session(url, body, headers=None):
    http = create_mcp_http_client(headers=headers) if headers else None
    async with streamable_http_client(url, http_client=http) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            return await body(session)


async def ok(session, name, args):
    result = await session.call_tool(name, args)
    assert not result.is_error, f"{name} failed: {result.content}"
    return result.structured_content


def raw_post(url, headers):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_tools_and_a_command_over_http(server):
    async def body(session):
        tools = (await session.list_tools()).tools
        assert len(tools) == 13 and all(t.output_schema for t in tools)
        r = await ok(session, "run_command", {"command": "echo over-http"})
        assert r["stdout"] == "over-http\n"
        await ok(session, "kill_sandbox", {"sandbox_id": r["sandbox_id"]})

    anyio.run(with_session, server.url, body)


def test_http_sessions_are_isolated(server):
    async def both():
        async def first(a):
            r = await ok(a, "run_command", {"command": "true"})
            a_id = r["sandbox_id"]

            async def second(b):
                listed = await ok(b, "list_sandboxes", {})
                assert listed["sandboxes"] == []
                res = await b.call_tool("run_command", {"command": "true", "sandbox_id": a_id})
                assert res.is_error and "no sandbox" in res.content[0].text
                res = await b.call_tool("kill_sandbox", {"sandbox_id": a_id})
                assert res.is_error

            await with_session(server.url, second)
            still = await ok(a, "run_command", {"command": "echo alive", "sandbox_id": a_id})
            assert still["stdout"] == "alive\n"
            await ok(a, "kill_sandbox", {"sandbox_id": a_id})

        await with_session(server.url, first)

    anyio.run(both)


def test_token_is_required_and_accepted(token_server):
    assert raw_post(token_server.url, {}) == 401
    assert raw_post(token_server.url, {"Authorization": "Bearer nope-nope-nope-nope-nope"}) == 401
    assert raw_post(token_server.url, {"Authorization": f"Bearer {TOKEN}"}) == 200

    async def body(session):
        r = await ok(session, "list_sandboxes", {})
        assert r["sandboxes"] == []

    anyio.run(lambda: with_session(token_server.url, body, headers={"Authorization": f"Bearer {TOKEN}"}))


def test_origin_is_checked(server):
    assert raw_post(server.url, {"Origin": "https://evil.example"}) == 403
    assert raw_post(server.url, {"Origin": "http://localhost:5173"}) == 200
    assert raw_post(server.url, {}) == 200


def test_listening_off_loopback_without_a_token_is_refused(state_dir):
    env = server_env(state_dir)
    env.pop("CAPSULE_TOKEN", None)
    proc = subprocess.run(
        [capsule_bin(), "serve", "--transport", "http", "--listen", f"0.0.0.0:{free_port()}"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode != 0
    assert "--token" in proc.stderr, proc.stderr


def test_sigterm_with_a_session_open_exits_promptly_and_pauses_sandboxes(state_dir):
    import signal
    import sqlite3
    import time

    s = HttpServer(state_dir)

    async def body(session):
        r = await ok(session, "run_command", {"command": "true"})
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        while s.proc.poll() is None and time.time() < deadline:
            await anyio.sleep(0.05)
        return r["sandbox_id"]

    try:
        sid = anyio.run(with_session, s.url, body)
    except BaseException as e:  # the session breaks when the server goes: expected
        if isinstance(e, KeyboardInterrupt):
            raise
        sid = None
    try:
        assert s.proc.poll() == 0, "capsule serve exits cleanly within 10 s of SIGTERM"
        rows = sqlite3.connect(f"{state_dir}/registry.sqlite3").execute("SELECT id, state FROM sandboxes").fetchall()
        assert rows and all(state == "paused" for _, state in rows), rows
        if sid:
            assert rows[0][0] == sid
    finally:
        s.stop()
