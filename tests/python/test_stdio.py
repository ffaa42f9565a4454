"""capsule serve over stdio, driven by the official Python MCP SDK (`mcp` on PyPI)."""

import base64
import os
import signal
import subprocess

import anyio
import jsonschema
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from conftest import agent_bin, capsule_bin, server_env

TOOLS = {
    "run_code", "run_command", "read_process", "kill_process", "write_file", "read_file", "list_files",
    "create_sandbox", "list_sandboxes", "pause", "resume", "fork", "kill_sandbox",
}


def params(state_dir: str, pidfile: str | None = None) -> StdioServerParameters:
    if pidfile:
        # exec keeps the pid, so the file names the server process itself.
        return StdioServerParameters(
            command="/bin/sh",
            args=["-c", f'echo $$ > "{pidfile}"; exec "{capsule_bin()}" serve'],
            env=server_env(state_dir),
        )
    return StdioServerParameters(command=capsule_bin(), args=["serve"], env=server_env(state_dir))


async def session_run(state_dir, body, pidfile=None, **kwargs):
    async with stdio_client(params(state_dir, pidfile)) as (read, write):
        async with ClientSession(read, write, **kwargs) as session:
            await session.initialize()
            return await body(session)


async def ok(session, name, args):
    result = await session.call_tool(name, args)
    assert not result.is_error, f"{name} failed: {result.content}"
    return result.structured_content


def test_tools_are_listed_with_valid_schemas_and_annotations(state_dir):
    async def body(session):
        tools = (await session.list_tools()).tools
        assert {t.name for t in tools} == TOOLS
        for tool in tools:
            assert tool.description and len(tool.description) > 40
            jsonschema.Draft202012Validator.check_schema(tool.input_schema)
            assert tool.output_schema is not None, tool.name
            jsonschema.Draft202012Validator.check_schema(tool.output_schema)
            assert tool.annotations is not None
            assert tool.annotations.read_only_hint is not None
            assert tool.annotations.destructive_hint is not None
            assert tool.annotations.idempotent_hint is not None

    anyio.run(session_run, state_dir, body)


def test_run_command_files_and_background_processes(state_dir):
    logs = []

    async def on_log(params):
        logs.append(params)

    async def body(session):
        r = await ok(session, "run_command", {"command": "echo hi; echo err >&2; exit 2"})
        assert (r["stdout"], r["stderr"], r["exit_code"]) == ("hi\n", "err\n", 2)
        # The SDK validated structured content against the output schema already.
        await ok(session, "write_file", {"path": "d/x.txt", "content": "abc"})
        got = await ok(session, "read_file", {"path": "d/x.txt"})
        assert got["content"] == "abc"
        listing = await ok(session, "list_files", {"path": "d"})
        assert [e["path"] for e in listing["entries"]] == ["x.txt"]
        png = base64.b64decode(
            "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
        )
        await ok(session, "write_file", {"path": "p.png", "content": base64.b64encode(png).decode(), "encoding": "base64"})
        img = await session.call_tool("read_file", {"path": "p.png"})
        images = [c for c in img.content if c.type == "image"]
        assert images and images[0].mime_type == "image/png"

        bg = await ok(session, "run_command", {"command": "echo started; sleep 60", "background": True})
        pid = bg["pid"]
        for _ in range(50):
            out = await ok(session, "read_process", {"pid": pid})
            if out["stdout"]:
                break
            await anyio.sleep(0.1)
        assert out["stdout"] == "started\n" and out["running"] is True
        await ok(session, "kill_process", {"pid": pid})
        for _ in range(50):
            out = await ok(session, "read_process", {"pid": pid})
            if not out["running"]:
                break
            await anyio.sleep(0.1)
        assert out["running"] is False and out["signal"] == 9

        bad = await session.call_tool("run_command", {"command": "true", "sandbox_id": "sb-nope"})
        assert bad.is_error and "list_sandboxes" in bad.content[0].text

    anyio.run(lambda: session_run(state_dir, body, logging_callback=on_log))
    assert any("hi" in str(getattr(l, "data", "")) for l in logs), "output chunks arrive as logging notifications"


def test_pause_resume_and_fork(state_dir):
    async def body(session):
        r = await ok(session, "run_command", {"command": "echo v1 > f.txt"})
        sid = r["sandbox_id"]
        paused = await ok(session, "pause", {})
        assert paused["sandbox"]["state"] == "paused"
        again = await ok(session, "run_command", {"command": "cat f.txt"})
        assert again["stdout"] == "v1\n", "a call on a paused sandbox resumes it"
        await ok(session, "pause", {"sandbox_id": sid})
        resumed = await ok(session, "resume", {"sandbox_id": sid})
        assert resumed["sandbox"]["state"] == "running"
        forked = await ok(session, "fork", {"count": 2})
        kids = [s["sandbox_id"] for s in forked["sandboxes"]]
        assert len(kids) == 2
        for kid in kids:
            k = await ok(session, "run_command", {"command": "cat f.txt", "sandbox_id": kid})
            assert k["stdout"] == "v1\n"
        listed = await ok(session, "list_sandboxes", {})
        assert {s["sandbox_id"] for s in listed["sandboxes"]} == {sid, *kids}
        for s in [sid, *kids]:
            await ok(session, "kill_sandbox", {"sandbox_id": s})

    anyio.run(session_run, state_dir, body)


def test_run_code_plot_comes_back_as_image_content(state_dir):
    async def body(session):
        r = await session.call_tool("run_code", {"code": "21 * 2"})
        if r.is_error and "not available in this agent build" in r.content[0].text:
            return "no-contexts"
        assert not r.is_error, r.content
        assert r.structured_content["results"][0]["text"] == "42"
        plot = await session.call_tool(
            "run_code",
            {"code": "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
                     "plt.plot([1, 4, 9])\nplt.show()"},
        )
        if plot.is_error and "matplotlib" in plot.content[0].text:
            return "no-matplotlib"
        images = [c for c in plot.content if c.type == "image"]
        assert images, plot.content
        assert images[0].mime_type == "image/png"
        assert base64.b64decode(images[0].data).startswith(b"\x89PNG")
        return "ok"

    outcome = anyio.run(session_run, state_dir, body)
    if outcome == "no-contexts":
        pytest.skip("this capsule-agent build has no language contexts yet (run_code answers Unsupported)")
    if outcome == "no-matplotlib":
        pytest.skip("matplotlib is not installed for the host python3 the test engine runs")


def test_restart_after_kill_9_while_paused(state_dir):
    pidfile = os.path.join(state_dir, "server.pid")

    async def before(session):
        r = await ok(session, "run_command", {"command": "echo survived > s.txt"})
        await ok(session, "pause", {})
        pid = int(open(pidfile).read().strip())
        os.kill(pid, signal.SIGKILL)
        return r["sandbox_id"]

    try:
        sid = anyio.run(session_run, state_dir, before, pidfile)
    except BaseException as e:  # the transport breaks under us: expected
        if isinstance(e, KeyboardInterrupt):
            raise
        sid = None
    if sid is None:
        import sqlite3
        sid = sqlite3.connect(os.path.join(state_dir, "registry.sqlite3")).execute(
            "SELECT id FROM sandboxes WHERE is_default = 1").fetchone()[0]

    async def after(session):
        listed = await ok(session, "list_sandboxes", {})
        states = {s["sandbox_id"]: s["state"] for s in listed["sandboxes"]}
        assert states.get(sid) == "paused", listed
        r = await ok(session, "run_command", {"command": "cat s.txt"})
        assert r["sandbox_id"] == sid and r["stdout"] == "survived\n"
        await ok(session, "kill_sandbox", {"sandbox_id": sid})

    anyio.run(session_run, state_dir, after)


def test_idle_sandboxes_pause_by_themselves_and_resume_on_the_next_call(state_dir):
    import mcp as _mcp  # noqa: F401  (the SDK is what drives this server)

    env = server_env(state_dir, CAPSULE_IDLE_PAUSE_AFTER="300ms")
    p = StdioServerParameters(command=capsule_bin(), args=["serve"], env=env)

    async def main():
        async with stdio_client(p) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                r = await ok(session, "run_command", {"command": "echo x > y.txt"})
                state = None
                for _ in range(40):
                    await anyio.sleep(0.1)
                    listed = await ok(session, "list_sandboxes", {})
                    state = listed["sandboxes"][0]["state"]
                    if state == "paused":
                        break
                assert state == "paused"
                again = await ok(session, "run_command", {"command": "cat y.txt"})
                assert again["stdout"] == "x\n"
                await ok(session, "kill_sandbox", {"sandbox_id": r["sandbox_id"]})

    anyio.run(main)


def test_serve_without_a_usable_engine_says_why_and_points_to_doctor(state_dir):
    env = server_env(state_dir)
    env.pop("CAPSULE_ENGINE")
    # No guest image (an empty cache): the default engine choice cannot use KVM, even on a KVM host.
    env["CAPSULE_CACHE_DIR"] = os.path.join(state_dir, "empty-cache")
    proc = subprocess.run([capsule_bin(), "serve"], env=env, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert "capsule doctor" in proc.stderr and "--engine test" in proc.stderr, proc.stderr


def test_long_runs_report_progress_to_the_client(state_dir):
    seen = []

    async def on_progress(progress, total, message):
        seen.append((progress, message))

    async def body(session):
        r = await session.call_tool("run_command", {"command": "sleep 2.5; echo done"}, progress_callback=on_progress)
        assert not r.is_error and r.structured_content["stdout"] == "done\n"
        await ok(session, "kill_sandbox", {"sandbox_id": r.structured_content["sandbox_id"]})

    anyio.run(session_run, state_dir, body)
    assert len(seen) >= 2, seen
    assert all(b[0] > a[0] for a, b in zip(seen, seen[1:])), seen
    assert "running for" in (seen[0][1] or "")
