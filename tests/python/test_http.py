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

import scenarios
from conftest import (ENGINES, HttpServer, capsule_bin, daemon_pid, free_port, kill9_daemon, skip_without_kvm,
                      new_state_dir, server_env, shutdown_daemon)
from scenarios import ok

TOKEN = "py-test-token-0123456789abcdef"


@pytest.fixture
def server(state_dir):
    s = HttpServer(state_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module", params=ENGINES)
def engine_server(request):
    """One server per engine for this module (its sandboxes' template is built once), in a
    state dir of its own; the kvm one skips, saying why, where the host cannot run it."""
    if request.param == "kvm":
        skip_without_kvm()
    with new_state_dir() as d:
        s = HttpServer(d, engine=request.param)
        s.engine = request.param
        yield s
        s.stop()
        shutdown_daemon(d)


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


def test_tools_and_a_command_over_http(engine_server):
    async def body(session):
        tools = (await session.list_tools()).tools
        assert len(tools) == 17 and all(t.output_schema for t in tools)
        r = await ok(session, "run_command", {"command": "echo over-http"})
        assert r["stdout"] == "over-http\n"
        await ok(session, "kill_sandbox", {"sandbox_id": r["sandbox_id"]})

    anyio.run(with_session, engine_server.url, body)


def test_run_code_plot_over_http(engine_server):
    anyio.run(with_session, engine_server.url, scenarios.plot_comes_back_as_image)


def test_files_and_background_processes_over_http(engine_server):
    async def body(session):
        sid = await scenarios.commands_files_and_background_processes(session)
        await ok(session, "kill_sandbox", {"sandbox_id": sid})

    anyio.run(with_session, engine_server.url, body)


def test_pause_resume_and_fork_keep_state_over_http(engine_server):
    async def body(session):
        await scenarios.pause_resume_and_fork_keep_state(session, forks_copy_memory=engine_server.engine == "kvm")

    anyio.run(with_session, engine_server.url, body)


def test_restart_after_kill_9_of_the_daemon_while_paused_over_http(state_dir, engine):
    # Sessions do not survive a restart; a --shared-sandboxes session sees the orphans. The
    # holder (`capsule serve --transport http`) starts a new daemon and listens again.
    server = HttpServer(state_dir, "--shared-sandboxes", engine=engine)
    try:
        async def before(session):
            sid, pid = await scenarios.start_stateful(session)
            await ok(session, "run_command", {"command": "echo survived > s.txt", "sandbox_id": sid})
            await ok(session, "pause", {"sandbox_id": sid})
            return sid, pid

        sid, pid = anyio.run(with_session, server.url, before)
        old = kill9_daemon(state_dir)
        server.wait_listening()
        assert daemon_pid(state_dir) not in (None, old), "a new daemon serves"
        anyio.run(with_session, server.url, lambda session: scenarios.state_survives_restart(session, sid, pid))
    finally:
        server.stop()


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


def test_sigterm_ends_the_listener_not_the_sandboxes_and_capsule_shutdown_pauses_them(state_dir):
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
        db = f"{state_dir}/registry.sqlite3"
        rows = sqlite3.connect(db).execute("SELECT id, state FROM sandboxes").fetchall()
        assert rows and all(state == "running" for _, state in rows), f"the daemon keeps them running: {rows}"
        if sid:
            assert rows[0][0] == sid
        shutdown_daemon(state_dir)
        assert daemon_pid(state_dir) is None
        rows = sqlite3.connect(db).execute("SELECT id, state FROM sandboxes").fetchall()
        assert rows and all(state == "paused" for _, state in rows), rows
    finally:
        s.stop()
