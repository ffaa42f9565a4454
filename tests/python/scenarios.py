"""What an agent does with a sandbox, as MCP tool calls: shared by the stdio and HTTP tests so
both transports and both engines are held to the same behaviour.

Each scenario takes an initialized `mcp.ClientSession` and asserts as it goes.
"""

import base64

import anyio

# A loop in the background that appends a line to ticks.txt ten times a second.
TICKER = "while true; do echo tick >> ticks.txt; sleep 0.1; done"
PLOT = ("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "plt.plot([1, 4, 9])\nplt.show()")
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)


async def ok(session, name, args):
    result = await session.call_tool(name, args)
    assert not result.is_error, f"{name} failed: {result.content}"
    return result.structured_content


async def code_value(session, code, sandbox_id=None):
    """The text of the main result of a Python cell."""
    args = {"code": code}
    if sandbox_id:
        args["sandbox_id"] = sandbox_id
    r = await ok(session, "run_code", args)
    mains = [x["text"] for x in r["results"] if x.get("is_main_result")]
    assert mains, r
    return mains[0]


async def ticks(session, sandbox_id):
    r = await ok(session, "run_command", {"command": "wc -l < ticks.txt", "sandbox_id": sandbox_id})
    return int(r["stdout"].strip())


async def assert_ticking(session, sandbox_id, pid):
    """The ticker `pid` runs and ticks.txt grows."""
    out = await ok(session, "read_process", {"pid": pid, "sandbox_id": sandbox_id})
    assert out["running"] is True, out
    before = await ticks(session, sandbox_id)
    for _ in range(50):
        await anyio.sleep(0.1)
        if await ticks(session, sandbox_id) > before:
            return
    raise AssertionError(f"the background loop stopped ticking in {sandbox_id} (still {before} lines)")


async def plot_comes_back_as_image(session):
    r = await ok(session, "run_code", {"code": "21 * 2"})
    assert r["results"][0]["text"] == "42"
    plot = await session.call_tool("run_code", {"code": PLOT})
    assert not plot.is_error, plot.content
    images = [c for c in plot.content if c.type == "image"]
    assert images, plot.content
    assert images[0].mime_type == "image/png"
    assert base64.b64decode(images[0].data).startswith(b"\x89PNG")
    await ok(session, "kill_sandbox", {"sandbox_id": r["sandbox_id"]})


async def commands_files_and_background_processes(session):
    r = await ok(session, "run_command", {"command": "echo hi; echo err >&2; exit 2"})
    assert (r["stdout"], r["stderr"], r["exit_code"]) == ("hi\n", "err\n", 2)
    sid = r["sandbox_id"]
    # The SDK validated structured content against the output schema already.
    await ok(session, "write_file", {"path": "d/x.txt", "content": "abc"})
    got = await ok(session, "read_file", {"path": "d/x.txt"})
    assert got["content"] == "abc"
    listing = await ok(session, "list_files", {"path": "d"})
    assert [e["path"] for e in listing["entries"]] == ["x.txt"]
    await ok(session, "write_file", {"path": "p.png", "content": base64.b64encode(PNG_1X1).decode(), "encoding": "base64"})
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
    return sid


async def start_stateful(session):
    """A sandbox whose Python context holds x = 41 and whose ticker runs; (id, ticker pid)."""
    r = await ok(session, "run_code", {"code": "x = 41"})
    sid = r["sandbox_id"]
    bg = await ok(session, "run_command", {"command": TICKER, "background": True, "sandbox_id": sid})
    await assert_ticking(session, sid, bg["pid"])
    return sid, bg["pid"]


async def assert_state_intact(session, sid, pid):
    """x is still 41 and the ticker still runs."""
    assert await code_value(session, "x + 1", sid) == "42"
    await assert_ticking(session, sid, pid)


async def pause_resume_and_fork_keep_state(session, forks_copy_memory):
    """Pause and resume keep the interpreter's state and a running process; a fork starts from
    the parent's state (files always; memory and processes where `forks_copy_memory`), then
    parent and children diverge."""
    sid, pid = await start_stateful(session)
    paused = await ok(session, "pause", {"sandbox_id": sid})
    assert paused["sandbox"]["state"] == "paused"
    resumed = await ok(session, "resume", {"sandbox_id": sid})
    assert resumed["sandbox"]["state"] == "running"
    await assert_state_intact(session, sid, pid)
    # A call on a paused sandbox resumes it.
    await ok(session, "pause", {"sandbox_id": sid})
    await assert_state_intact(session, sid, pid)

    await ok(session, "run_command", {"command": "echo v1 > f.txt", "sandbox_id": sid})
    forked = await ok(session, "fork", {"count": 2, "sandbox_id": sid})
    kids = [s["sandbox_id"] for s in forked["sandboxes"]]
    assert len(kids) == 2 and sid not in kids
    for n, kid in enumerate(kids):
        k = await ok(session, "run_command", {"command": "cat f.txt", "sandbox_id": kid})
        assert k["stdout"] == "v1\n"
        if forks_copy_memory:
            assert await code_value(session, "x", kid) == "41", "the child has the parent's variables"
            await assert_ticking(session, kid, pid)
        await code_value(session, f"x = {100 + n}\nx", kid)
        await ok(session, "run_command", {"command": f"echo kid{n} > f.txt", "sandbox_id": kid})
    # Diverged: each keeps its own variable and files.
    assert await code_value(session, "x", sid) == "41"
    assert (await ok(session, "run_command", {"command": "cat f.txt", "sandbox_id": sid}))["stdout"] == "v1\n"
    for n, kid in enumerate(kids):
        assert await code_value(session, "x", kid) == str(100 + n)
        k = await ok(session, "run_command", {"command": "cat f.txt", "sandbox_id": kid})
        assert k["stdout"] == f"kid{n}\n"
    await assert_ticking(session, sid, pid)
    listed = await ok(session, "list_sandboxes", {})
    assert {sid, *kids} <= {s["sandbox_id"] for s in listed["sandboxes"]}
    for s in [sid, *kids]:
        await ok(session, "kill_sandbox", {"sandbox_id": s})


async def state_survives_restart(session, sid, pid):
    """After a server restart: the sandbox is listed paused; the next call resumes it with its
    variable, its ticker and its files."""
    listed = await ok(session, "list_sandboxes", {})
    states = {s["sandbox_id"]: s["state"] for s in listed["sandboxes"]}
    assert states.get(sid) == "paused", listed
    r = await ok(session, "run_command", {"command": "cat s.txt", "sandbox_id": sid})
    assert r["sandbox_id"] == sid and r["stdout"] == "survived\n"
    await assert_state_intact(session, sid, pid)
    await ok(session, "kill_sandbox", {"sandbox_id": sid})
