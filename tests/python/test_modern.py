"""The sessionless MCP revision 2026-07-28 beside 2025-11-25, on the same `capsule serve`
endpoints, driven by the official Python MCP SDK's `Client` (`mode="2026-07-28"` pins it,
`mode="auto"` probes `server/discover`): no `initialize`, per-request `_meta`, the same tools.
A 2026-07-28 request acts for its client's name, so its default sandbox and interpreter state
carry over from request to request and connection to connection, and over stdio it is the
same sandbox a 2025-11-25 session of that client name gets. Over HTTP it is offered only with a
token (without one, sessions are a client's only identity, and `auto` falls back to the
handshake). Log messages go to a 2026-07-28 request only when its `_meta` asks for them.
Raw JSON-RPC, as a client without an SDK sends it, checks the wire itself: `server/discover`,
stateless `tools/list` and `tools/call` with `_meta`, and the routing headers' rules (missing
or contradicting `Mcp-Method`/`Mcp-Name`/`MCP-Protocol-Version` answered 400 with -32020, an
unknown version -32022, a request without `_meta` -32602)."""

import json
import subprocess
import urllib.error
import urllib.request

import anyio
import pytest
from mcp import Client, ClientSession, Implementation
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

import scenarios
from conftest import HttpServer, capsule_bin, server_env, shutdown_daemon
from scenarios import ok
from test_stdio import params

MODERN = "2026-07-28"
TOKEN = "py-modern-token-0123456789abcdef"


def me(name: str) -> Implementation:
    return Implementation(name=name, version="1")


def test_a_stateless_stdio_client_keeps_its_default_sandbox_across_requests_and_eras(state_dir, engine):
    async def body():
        async with Client(params(state_dir, engine), mode=MODERN, client_info=me("modern-a")) as c:
            assert c.protocol_version == MODERN
            first = [t.name for t in (await c.list_tools()).tools]
            again = [t.name for t in (await c.list_tools()).tools]
            assert first == again, "tools/list is deterministic"
            assert "run_code" in first and "fork" in first
            await ok(c, "run_code", {"code": "x = 41"})
            assert await scenarios.code_value(c, "x + 1") == "42"
            r = await ok(c, "run_command", {"command": "echo hello from 2026"})
            assert r["stdout"] == "hello from 2026\n"
            listed = await ok(c, "list_sandboxes", {})
            assert len(listed["sandboxes"]) == 1
            sandbox = listed["sandboxes"][0]["sandbox_id"]
        # A new connection of the same client name, in the same era: the same sandbox.
        async with Client(params(state_dir, engine), mode=MODERN, client_info=me("modern-a")) as c:
            assert await scenarios.code_value(c, "x") == "41"
        # The same client name with the handshake: the same default sandbox, with its state.
        async with stdio_client(params(state_dir, engine)) as (read, write):
            async with ClientSession(read, write, client_info=me("modern-a")) as s:
                assert (await s.initialize()).protocol_version == "2025-11-25"
                assert await scenarios.code_value(s, "x") == "41"
                names = [t.name for t in (await s.list_tools()).tools]
                assert names == first, "both eras list the same tools"
        # Another client name has its own.
        async with Client(params(state_dir, engine), mode=MODERN, client_info=me("modern-b")) as c:
            assert (await ok(c, "list_sandboxes", {}))["sandboxes"] == []
        async with Client(params(state_dir, engine), mode=MODERN, client_info=me("modern-a")) as c:
            await ok(c, "kill_sandbox", {"sandbox_id": sandbox})

    anyio.run(body)


def test_auto_mode_finds_2026_07_28_through_server_discover(state_dir):
    async def body():
        async with Client(params(state_dir), mode="auto", client_info=me("auto")) as c:
            assert c.protocol_version == MODERN
            r = await ok(c, "run_command", {"command": "echo auto"})
            assert r["stdout"] == "auto\n"

    anyio.run(body)


def test_log_messages_go_to_a_stateless_request_only_when_it_asks(state_dir):
    async def run(log_level):
        got = []

        async def on_log(params):
            got.append(params)

        kwargs = {"log_level": log_level, "logging_callback": on_log} if log_level else {"logging_callback": on_log}
        async with Client(params(state_dir), mode=MODERN, client_info=me("logs"), **kwargs) as c:
            r = await ok(c, "run_command", {"command": "echo logged-line"})
            assert r["stdout"] == "logged-line\n"
        return got

    assert anyio.run(run, None) == [], "no log messages without io.modelcontextprotocol/logLevel"
    got = anyio.run(run, "info")
    assert any("logged-line" in str(m.data) for m in got), got


def modern_http(url, name, token=TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else None
    http = create_mcp_http_client(headers=headers) if headers else None
    return Client(streamable_http_client(url, http_client=http), mode=MODERN, client_info=me(name))


def test_over_http_with_a_token_a_stateless_client_keeps_its_sandbox_across_connections(state_dir):
    server = HttpServer(state_dir, token=TOKEN)
    try:
        async def body():
            async with modern_http(server.url, "web-a") as c:
                assert c.protocol_version == MODERN
                await ok(c, "run_code", {"code": "y = 'kept'"})
            async with modern_http(server.url, "web-a") as c:
                assert await scenarios.code_value(c, "y") == "'kept'"
                sandbox = (await ok(c, "list_sandboxes", {}))["sandboxes"][0]["sandbox_id"]
            async with modern_http(server.url, "web-b") as c:
                assert (await ok(c, "list_sandboxes", {}))["sandboxes"] == []
                res = await c.call_tool("run_command", {"command": "true", "sandbox_id": sandbox})
                assert res.is_error and "no sandbox" in res.content[0].text
            async with modern_http(server.url, "web-a") as c:
                await ok(c, "kill_sandbox", {"sandbox_id": sandbox})

        anyio.run(body)
    finally:
        server.stop()


def test_over_http_without_a_token_only_the_handshake_is_offered(state_dir):
    server = HttpServer(state_dir)
    try:
        async def auto():
            async with Client(server.url, mode="auto", client_info=me("no-token")) as c:
                assert c.protocol_version == "2025-11-25", "auto falls back to the handshake"
                r = await ok(c, "run_command", {"command": "echo legacy"})
                assert r["stdout"] == "legacy\n"

        anyio.run(auto)

        async def pinned():
            async with modern_http(server.url, "no-token", token=None) as c:
                await c.list_tools()

        with pytest.raises(Exception) as refused:
            anyio.run(pinned)
        assert "2026-07-28" in repr(refused.value) or "protocol" in repr(refused.value).lower(), refused.value
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# Raw JSON-RPC, as a client without an SDK sends it
# ---------------------------------------------------------------------------


HEADER_MISMATCH, UNSUPPORTED_VERSION, INVALID_PARAMS = -32020, -32022, -32602


def meta(version=MODERN, name="raw-client"):
    return {"io.modelcontextprotocol/protocolVersion": version,
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": name, "version": "1"}}


def request(rid, method, params=None, version=MODERN, with_meta=True):
    params = dict(params or {})
    if with_meta:
        params["_meta"] = meta(version)
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}


def post(url, body, headers):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Accept": "application/json, text/event-stream",
        "Authorization": f"Bearer {TOKEN}", **headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, ctype, text = resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as e:
        status, ctype, text = e.code, e.headers.get("Content-Type", ""), e.read().decode()
    if "text/event-stream" in ctype:
        datas = [line[5:].strip() for line in text.splitlines() if line.startswith("data:") and line[5:].strip()]
        messages = [json.loads(d) for d in datas]
        text = json.dumps([m for m in messages if "id" in m][-1]) if messages else "{}"
    return status, json.loads(text) if text else {}


def routed(method, name=None, version=MODERN):
    headers = {"MCP-Protocol-Version": version, "Mcp-Method": method}
    if name:
        headers["Mcp-Name"] = name
    return headers


def test_raw_2026_07_28_over_http_discover_list_call_and_header_rules(state_dir):
    server = HttpServer(state_dir, token=TOKEN)
    try:
        status, r = post(server.url, request(1, "server/discover"), routed("server/discover"))
        assert status == 200, r
        assert {"2026-07-28", "2025-11-25"} <= set(r["result"]["supportedVersions"]), r
        assert r["result"]["capabilities"]["tools"] is not None

        lists = [post(server.url, request(i, "tools/list"), routed("tools/list")) for i in (2, 3)]
        for status, r in lists:
            assert status == 200 and r["result"]["resultType"] == "complete" and "ttlMs" in r["result"], r
        assert lists[0][1]["result"]["tools"] == lists[1][1]["result"]["tools"], "tools/list is deterministic"

        call = request(4, "tools/call", {"name": "run_command", "arguments": {"command": "echo raw"}})
        status, r = post(server.url, call, routed("tools/call", "run_command"))
        assert status == 200 and r["result"]["structuredContent"]["stdout"] == "raw\n", r
        assert r["result"]["resultType"] == "complete"

        # The routing headers must be there and agree with the body.
        for headers, what in [
            ({"MCP-Protocol-Version": MODERN}, "no Mcp-Method"),
            (routed("tools/list"), "Mcp-Method says tools/list"),
            (routed("tools/call", "kill_sandbox"), "Mcp-Name says kill_sandbox"),
            (routed("tools/call", "run_command", version="2025-11-25"), "the header's version differs from _meta's"),
        ]:
            status, r = post(server.url, call, headers)
            assert status == 400 and r["error"]["code"] == HEADER_MISMATCH, (what, status, r)
        status, r = post(server.url, request(5, "tools/list", version="2099-01-01"),
                         routed("tools/list", version="2099-01-01"))
        assert r["error"]["code"] == UNSUPPORTED_VERSION, r
        status, r = post(server.url, request(6, "tools/list", with_meta=False), routed("tools/list"))
        assert status == 400 and r["error"]["code"] == INVALID_PARAMS and "_meta" in r["error"]["message"], r
    finally:
        server.stop()
        shutdown_daemon(state_dir)


def test_raw_2026_07_28_over_stdio_without_initialize(state_dir):
    proc = subprocess.Popen([capsule_bin(), "serve"], env=server_env(state_dir), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        def ask(body):
            proc.stdin.write(json.dumps(body) + "\n")
            proc.stdin.flush()
            while True:
                reply = json.loads(proc.stdout.readline())
                if reply.get("id") == body["id"]:
                    return reply

        r = ask(request(1, "server/discover"))
        assert "2026-07-28" in r["result"]["supportedVersions"], r
        r = ask(request(2, "tools/call", {"name": "run_command", "arguments": {"command": "echo stdio raw"}}))
        assert r["result"]["structuredContent"]["stdout"] == "stdio raw\n", r
        r = ask(request(3, "tools/list", version="2099-01-01"))
        assert r["error"]["code"] == UNSUPPORTED_VERSION, r
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        shutdown_daemon(state_dir)
