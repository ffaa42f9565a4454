"""Many MCP clients on one host: every `capsule serve` works through the one daemon that owns
the state directory, and nothing but kill_sandbox (or retention) loses a sandbox, whichever of
the daemon, a relay or a client goes away.

Each client is the official Python MCP SDK over stdio, identified by its `clientInfo.name`.
"""

import os
import signal
import sqlite3
import subprocess
import time

import anyio
import mcp.types as types
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

import scenarios
from conftest import capsule_bin, daemon_pid, kill9_daemon, server_env
from scenarios import code_value, ok


async def as_client(state_dir, engine, name, body, pidfile=None):
    """Runs `body(session)` in a stdio session of a client named `name`."""
    env = server_env(state_dir, engine)
    if pidfile:
        # exec keeps the pid, so the file names the relay process itself.
        params = StdioServerParameters(
            command="/bin/sh", args=["-c", f'echo $$ > "{pidfile}"; exec "{capsule_bin()}" serve'], env=env
        )
    else:
        params = StdioServerParameters(command=capsule_bin(), args=["serve"], env=env)
    info = types.Implementation(name=name, version="1.0")
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write, client_info=info) as session:
            await session.initialize()
            return await body(session)


def states(state_dir):
    db = sqlite3.connect(os.path.join(state_dir, "registry.sqlite3"))
    return dict(db.execute("SELECT id, state FROM sandboxes").fetchall())


def test_a_second_client_neither_sees_nor_fails_the_first_clients_sandbox(state_dir, engine):
    async def both():
        async def a_body(a):
            r = await ok(a, "run_code", {"code": "marker = 'from-A'"})
            a_id = r["sandbox_id"]

            async def b_body(b):
                listed = await ok(b, "list_sandboxes", {})
                assert listed["sandboxes"] == [], f"B sees only its own sandboxes: {listed}"
                mine = await ok(b, "run_command", {"command": "echo b"})
                assert mine["sandbox_id"] != a_id, "different clients get different default sandboxes"
                return mine["sandbox_id"]

            b_id = await as_client(state_dir, engine, "client-b", b_body)
            # B has come and gone; A's sandbox is untouched.
            assert await code_value(a, "marker") == "'from-A'"
            assert states(state_dir)[a_id] == "running"
            assert "failed" not in states(state_dir).values(), states(state_dir)
            return a_id, b_id

        return await as_client(state_dir, engine, "client-a", a_body)

    a_id, b_id = anyio.run(both)

    async def a_again(a):
        # A restarted client with the same name gets its default sandbox back.
        assert await code_value(a, "marker") == "'from-A'"
        listed = await ok(a, "list_sandboxes", {})
        assert [s["sandbox_id"] for s in listed["sandboxes"]] == [a_id], listed
        assert listed["default_sandbox_id"] == a_id
        await ok(a, "kill_sandbox", {"sandbox_id": a_id})

    anyio.run(lambda: as_client(state_dir, engine, "client-a", a_again))
    assert states(state_dir)[b_id] == "running", "B's sandbox outlived B"


def test_kill_9_of_the_daemon_stops_no_sandbox(state_dir, engine):
    started = {}

    async def before(session):
        sid, pid = await scenarios.start_stateful(session)
        started.update(sid=sid, pid=pid, ticks=await scenarios.ticks(session, sid))
        killed = kill9_daemon(state_dir)
        started.update(killed=killed, at=time.monotonic())

    try:
        anyio.run(lambda: as_client(state_dir, engine, "survivor", before))
    except BaseException as e:  # the relay loses its daemon: expected
        if isinstance(e, KeyboardInterrupt):
            raise
    assert started.get("killed"), "the daemon was killed mid-session"
    time.sleep(1)
    client_started = time.monotonic()

    async def after(session):
        first = await ok(session, "run_command", {"command": "true", "sandbox_id": started["sid"]})
        print(f"\nafter kill -9 of the daemon, a new stdio client's first run_command answered "
              f"{time.monotonic() - client_started:.3f} s after the client started (daemon start, "
              f"reattach, initialize and the call)")
        assert first["sandbox_id"] == started["sid"]
        listed = await ok(session, "list_sandboxes", {})
        state = {s["sandbox_id"]: s["state"] for s in listed["sandboxes"]}[started["sid"]]
        assert state == "running", f"it kept running without a daemon: {listed}"
        now = await scenarios.ticks(session, started["sid"])
        assert now > started["ticks"] + 5, f"the loop ran on across the gap: {started['ticks']} then {now}"
        await scenarios.assert_state_intact(session, started["sid"], started["pid"])
        await ok(session, "kill_sandbox", {"sandbox_id": started["sid"]})

    anyio.run(lambda: as_client(state_dir, engine, "survivor", after))
    assert daemon_pid(state_dir) not in (None, started["killed"]), "a new daemon serves"


def test_kill_9_of_a_relay_mid_call_leaves_the_daemon_and_other_clients_alone(state_dir):
    pidfile = os.path.join(state_dir, "relay.pid")

    async def doomed(session):
        async with anyio.create_task_group() as tg:
            tg.start_soon(session.call_tool, "run_command", {"command": "sleep 30"})
            await anyio.sleep(1.0)
            os.kill(int(open(pidfile).read().strip()), signal.SIGKILL)
            await anyio.sleep(30)

    daemon_before = None

    async def first(session):
        nonlocal daemon_before
        await ok(session, "run_command", {"command": "true"})
        daemon_before = daemon_pid(state_dir)

    anyio.run(lambda: as_client(state_dir, "test", "steady", first))
    with pytest.raises(BaseException):
        anyio.run(lambda: as_client(state_dir, "test", "doomed", doomed, pidfile=pidfile))

    async def steady(session):
        r = await ok(session, "run_command", {"command": "echo still"})
        assert r["stdout"] == "still\n"

    anyio.run(lambda: as_client(state_dir, "test", "steady", steady))
    assert daemon_pid(state_dir) == daemon_before, "the same daemon serves on"


def test_another_user_cannot_reach_the_daemon(state_dir):
    async def body(session):
        await ok(session, "run_command", {"command": "true"})

    anyio.run(lambda: as_client(state_dir, "test", "owner", body))
    pid = daemon_pid(state_dir)
    # `nobody` runs capsule serve and capsule ps on this state directory.
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    env = server_env(state_dir, "test")
    served = subprocess.run([*as_nobody, capsule_bin(), "serve"], env=env, capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    assert served.returncode != 0
    assert "owned by uid 0" in served.stderr or "Permission denied" in served.stderr, served.stderr
    # A raw connection to the socket, as nobody.
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print('refused', e.errno)\n"
             "else:\n    s.sendall(b'{\"role\":\"ps\",\"version\":1}\\n'); print('answer', s.recv(4096))\n")
    raw = subprocess.run([*as_nobody, "python3", "-c", probe, os.path.join(state_dir, "capsule.sock")],
                         capture_output=True, text=True, timeout=30)
    assert raw.stdout.startswith("refused"), (raw.stdout, raw.stderr)
    assert daemon_pid(state_dir) == pid, "the daemon is untouched"
