"""Agent-task evals: six realistic agent sessions against one `capsule serve`, each graded.

Each task is what an agent would do with the tools to get a job done (analyse a CSV and plot
it, fix a failing test, run a web service, explore with forks, pause a running job, drive an
interactive program), driven through the official Python MCP SDK over stdio. Every task runs
in its own sandbox (`create_sandbox`, killed at the end) and is graded by assertions on the
tool results. The table gives each task's result, wall time and tool calls; the exit status is
non-zero when any task fails.

Run: `python3 evals/agent_tasks/run.py [--engine kvm|test] [--only NAME[,NAME...]]`
(after `. scripts/test-env.sh`; uses the debug build of `capsule` and `capsule-agent` unless
CAPSULE_BIN / CAPSULE_AGENT_BIN say otherwise; kvm needs a built guest image).

Paths inside a sandbox are built from its work directory (`pwd`), so the tasks touch nothing
outside the sandbox on the test engine either (whose sandboxes are host processes).
"""

import argparse
import base64
import json
import os
import pathlib
import sys
import subprocess
import tempfile
import time
import traceback

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

REPO = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
CAPSULE = os.environ.get("CAPSULE_BIN") or str(TARGET / "debug" / "capsule")
AGENT = os.environ.get("CAPSULE_AGENT_BIN") or str(pathlib.Path(CAPSULE).parent / "capsule-agent")
TASK_TIMEOUT_S = 300


class Skip(Exception):
    """The engine cannot do what the task needs."""


class Failed(Exception):
    """A tool call or a check failed."""


def check(cond, why):
    if not cond:
        raise Failed(why)


class Agent:
    """One task's view of the session: counts its tool calls and remembers its sandboxes."""

    def __init__(self, session, engine):
        self.session = session
        self.engine = engine
        self.calls = 0
        self.sandboxes = []

    async def call(self, name, args):
        self.calls += 1
        return await self.session.call_tool(name, args)

    async def ok(self, name, args):
        r = await self.call(name, args)
        if r.is_error:
            raise Failed(f"{name} {json.dumps(args)[:200]} failed: {text_of(r)}")
        return r.structured_content

    async def sandbox(self, name):
        """A new sandbox for this task, and its work directory."""
        made = await self.ok("create_sandbox", {"name": name, "make_default": False})
        sid = made["sandbox"]["sandbox_id"]
        self.sandboxes.append(sid)
        pwd = await self.ok("run_command", {"command": "pwd", "sandbox_id": sid})
        check(pwd["exit_code"] == 0 and pwd["stdout"].startswith("/"), f"pwd: {pwd}")
        return sid, pwd["stdout"].strip()

    async def sh(self, sid, command, **kw):
        return await self.ok("run_command", {"command": command, "sandbox_id": sid, **kw})

    async def py(self, sid, code):
        """Run a Python cell; fail on an exception; the result."""
        r = await self.ok("run_code", {"code": code, "sandbox_id": sid})
        check(r["error"] is None, f"cell raised {r['error']}")
        return r

    async def kill(self, sid):
        await self.ok("kill_sandbox", {"sandbox_id": sid})
        self.sandboxes.remove(sid)

    async def cleanup(self):
        for sid in list(self.sandboxes):
            try:
                await self.call("kill_sandbox", {"sandbox_id": sid})
            except Exception:  # noqa: BLE001 - cleanup is best effort; the task's result stands
                pass
        self.sandboxes.clear()


def text_of(result):
    return " ".join(c.text for c in result.content if getattr(c, "type", "") == "text")


def main_text(r):
    mains = [x["text"] for x in r["results"] if x.get("is_main_result")]
    check(mains, f"no main result in {r}")
    return mains[0]


async def until(what, probe, timeout_s=30.0, every_s=0.1):
    """Poll `probe` (async, returns a value or None) until it gives a value; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        last = await probe()
        if last is not None and last is not False:
            return last
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await anyio.sleep(every_s)


# ---------------------------------------------------------------------------------------------
# 1. data-analysis

CSV = """region,product,amount
north,widget,120.5
south,widget,80
north,gadget,45.25
east,widget,60
south,gadget,100
east,gadget,15.75
north,widget,34.25
"""
EXPECTED_TOTALS = {"east": 75.75, "north": 200.0, "south": 180.0}


async def data_analysis(a):
    sid, home = await a.sandbox("data-analysis")
    if a.engine == "test":
        probe = await a.sh(sid, "python3 -c 'import pandas, matplotlib'")
        if probe["exit_code"] != 0:
            raise Skip("test engine: the host's python3 (its sandboxes' Python) has no pandas/matplotlib")
    await a.ok("write_file", {"path": f"{home}/data/sales.csv", "content": CSV, "sandbox_id": sid})
    r = await a.py(sid, f"import json\nimport pandas as pd\ndf = pd.read_csv({home + '/data/sales.csv'!r})\n"
                        "totals = df.groupby('region')['amount'].sum().sort_index()\n"
                        "print(json.dumps(totals.round(2).to_dict()))\nlen(df)")
    check(main_text(r) == "7", f"len(df) gave {main_text(r)!r}")
    got = json.loads(r["stdout"].strip().splitlines()[-1])
    check(got == EXPECTED_TOTALS, f"group-by gave {got}, expected {EXPECTED_TOTALS}")
    plot = await a.call("run_code", {"sandbox_id": sid, "code": (
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(figsize=(4, 3))\ntotals.plot.bar(ax=ax)\nax.set_ylabel('amount')\n"
        f"fig.savefig({home + '/data/totals.png'!r})\nplt.show()")})
    check(not plot.is_error, f"plot cell failed: {text_of(plot)}")
    check(plot.structured_content["error"] is None, f"plot cell raised {plot.structured_content['error']}")
    images = [c for c in plot.content if getattr(c, "type", "") == "image"]
    check(images, f"no image content in the plot result: {[getattr(c, 'type', c) for c in plot.content]}")
    for img in images:
        mime = getattr(img, "mime_type", None) or getattr(img, "mimeType", None)
        check(mime == "image/png", f"image mime type {mime}")
        png = base64.b64decode(img.data)
        check(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000, f"not a PNG: {png[:16]!r} ({len(png)} bytes)")
    # The saved file comes back as an image too.
    f = await a.call("read_file", {"path": f"{home}/data/totals.png", "sandbox_id": sid})
    check(not f.is_error, f"read_file of the PNG failed: {text_of(f)}")
    fimg = [c for c in f.content if getattr(c, "type", "") == "image"]
    check(fimg and base64.b64decode(fimg[0].data).startswith(b"\x89PNG"), "read_file gave no PNG image")
    a.note = f"work dir {home}, {len(images)} image(s)"
    await a.kill(sid)


# ---------------------------------------------------------------------------------------------
# 2. python-package

STATS_BUGGY = '''"""Small statistics helpers."""


def mean(xs):
    xs = list(xs)
    if not xs:
        raise ValueError("mean of an empty sequence")
    return sum(xs) / len(xs)


def median(xs):
    xs = sorted(xs)
    if not xs:
        raise ValueError("median of an empty sequence")
    mid = len(xs) // 2
    return xs[mid]  # BUG: wrong for an even number of values
'''
STATS_FIXED = STATS_BUGGY.replace(
    "    return xs[mid]  # BUG: wrong for an even number of values\n",
    "    if len(xs) % 2:\n        return xs[mid]\n    return (xs[mid - 1] + xs[mid]) / 2\n",
)
TESTS = '''import unittest

from statskit import mean, median


class StatsTest(unittest.TestCase):
    def test_mean(self):
        self.assertEqual(mean([1, 2, 3, 4]), 2.5)

    def test_mean_empty(self):
        with self.assertRaises(ValueError):
            mean([])

    def test_median_odd(self):
        self.assertEqual(median([3, 1, 2]), 2)

    def test_median_even(self):
        self.assertEqual(median([4, 1, 3, 2]), 2.5)


if __name__ == "__main__":
    unittest.main()
'''


async def python_package(a):
    sid, home = await a.sandbox("python-package")
    proj = f"{home}/statskit-proj"
    files = {
        "statskit/__init__.py": "from .stats import mean, median\n\n__all__ = ['mean', 'median']\n",
        "statskit/stats.py": STATS_BUGGY,
        "tests/__init__.py": "",
        "tests/test_stats.py": TESTS,
    }
    for path, content in files.items():
        await a.ok("write_file", {"path": f"{proj}/{path}", "content": content, "sandbox_id": sid})
    listing = await a.ok("list_files", {"path": proj, "depth": 2, "sandbox_id": sid})
    paths = {e["path"] for e in listing["entries"]}
    check({"statskit/stats.py", "tests/test_stats.py"} <= paths, f"list_files gave {sorted(paths)}")
    has_pytest = (await a.sh(sid, "python3 -c 'import pytest'"))["exit_code"] == 0
    runner = "python3 -m pytest -q" if has_pytest else "python3 -m unittest -v"
    a.note = f"runner: {runner.split()[2]}"
    first = await a.sh(sid, runner, cwd=proj, timeout_s=120)
    out = first["stdout"] + first["stderr"]
    check(first["exit_code"] not in (0, None), f"tests passed with the bug in (exit {first['exit_code']}): {out[-800:]}")
    check("test_median_even" in out, f"the failing test is not named in the output: {out[-800:]}")
    check(("1 failed" in out) if has_pytest else ("FAILED (failures=1)" in out), f"not exactly one failure: {out[-800:]}")
    await a.ok("write_file", {"path": f"{proj}/statskit/stats.py", "content": STATS_FIXED, "sandbox_id": sid})
    second = await a.sh(sid, runner, cwd=proj, timeout_s=120)
    out = second["stdout"] + second["stderr"]
    check(second["exit_code"] == 0, f"tests still fail after the fix (exit {second['exit_code']}): {out[-800:]}")
    check(("4 passed" in out) if has_pytest else ("Ran 4 tests" in out and "OK" in out), f"not 4 passing tests: {out[-800:]}")
    await a.kill(sid)


# ---------------------------------------------------------------------------------------------
# 3. web-service

async def web_service(a):
    sid, home = await a.sandbox("web-service")
    token = f"capsule-eval-{os.getpid()}-{time.time_ns() % 10**6}"
    await a.ok("write_file", {"path": f"{home}/site/index.html", "sandbox_id": sid,
                              "content": f"<html><body><h1>{token}</h1></body></html>\n"})
    await a.ok("write_file", {"path": f"{home}/site/api/status.json", "sandbox_id": sid,
                              "content": json.dumps({"ok": True, "token": token})})
    port = 8000
    if a.engine == "test":
        # Test-engine sandboxes share the host's network: take a free port rather than 8000.
        free = await a.sh(sid, "python3 -c 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); "
                               "print(s.getsockname()[1])'")
        port = int(free["stdout"])
    bg = await a.sh(sid, f"exec python3 -u -m http.server {port} --bind 127.0.0.1 --directory {home}/site",
                    background=True)
    pid = bg["pid"]
    check(isinstance(pid, int), f"no pid from a background run_command: {bg}")

    async def serving():
        r = await a.ok("read_process", {"pid": pid, "sandbox_id": sid})
        check(r["running"], f"the server exited: {r}")
        return "Serving HTTP" in r["stdout"]

    await until("the server to say it is serving", serving, timeout_s=60, every_s=0.2)
    has_curl = (await a.sh(sid, "command -v curl"))["exit_code"] == 0
    if has_curl:
        fetch = "curl -sS --max-time 10 http://127.0.0.1:PORT/{}"
    else:
        fetch = ("python3 -c 'import sys, urllib.request; "
                 "sys.stdout.write(urllib.request.urlopen(\"http://127.0.0.1:PORT/{}\", timeout=10).read().decode())'")
    fetch = fetch.replace("PORT", str(port))
    a.note = f"client: {'curl' if has_curl else 'urllib'}, port {port}"
    page = await a.sh(sid, fetch.format(""), timeout_s=30)
    check(page["exit_code"] == 0 and f"<h1>{token}</h1>" in page["stdout"], f"GET / gave {page}")
    api = await a.sh(sid, fetch.format("api/status.json"), timeout_s=30)
    check(api["exit_code"] == 0, f"GET /api/status.json gave {api}")
    check(json.loads(api["stdout"]) == {"ok": True, "token": token}, f"GET /api/status.json body {api['stdout']!r}")
    if has_curl:
        status_of = "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:PORT/nope"
    else:
        status_of = ("python3 -c 'import urllib.request, urllib.error\ntry:\n urllib.request.urlopen("
                     "\"http://127.0.0.1:PORT/nope\")\nexcept urllib.error.HTTPError as e:\n print(e.code, end=\"\")'")
    missing = await a.sh(sid, status_of.replace("PORT", str(port)))
    check(missing["stdout"] == "404", f"GET /nope gave {missing}")
    log = await a.ok("read_process", {"pid": pid, "sandbox_id": sid})
    check('"GET / HTTP/1.1" 200' in log["stderr"] and "/api/status.json" in log["stderr"],
          f"the access log lacks the requests: {log['stderr'][-500:]!r}")
    await a.ok("kill_process", {"pid": pid, "signal": 15, "sandbox_id": sid})

    async def stopped():
        r = await a.ok("read_process", {"pid": pid, "sandbox_id": sid})
        return r if not r["running"] else None

    done = await until("the server to stop", stopped, timeout_s=30)
    check(done["signal"] == 15 or done["exit_code"] is not None, f"odd end of the server: {done}")
    gone = await a.sh(sid, fetch.format(""), timeout_s=30)
    check(gone["exit_code"] != 0, f"the server still answers after kill_process: {gone}")
    await a.kill(sid)


# ---------------------------------------------------------------------------------------------
# 4. fork-explore

APPROACHES = {
    # Sum of the squares of data (1..100): only the first is right.
    "generator": "answer = sum(x * x for x in data)",
    "square-of-sum": "answer = sum(data) ** 2 // len(data)",
    "off-by-one": "answer = sum(x * x for x in data[1:])",
}
RIGHT = sum(x * x for x in range(1, 101))


async def fork_explore(a):
    if a.engine == "test":
        raise Skip("test engine: fork copies files only, not the interpreter's variables")
    sid, home = await a.sandbox("fork-explore")
    await a.py(sid, "data = list(range(1, 101))\nsecret = 'kept-in-memory'")
    await a.ok("write_file", {"path": f"{home}/task.txt", "sandbox_id": sid,
                              "content": "sum of the squares of data\n"})
    forked = await a.ok("fork", {"count": 3, "sandbox_id": sid})
    kids = [s["sandbox_id"] for s in forked["sandboxes"]]
    check(len(kids) == 3 and sid not in kids and len(set(kids)) == 3, f"fork gave {kids}")
    a.sandboxes.extend(kids)
    answers = {}
    for kid, (name, code) in zip(kids, APPROACHES.items()):
        task = await a.ok("read_file", {"path": f"{home}/task.txt", "sandbox_id": kid})
        check(task["content"] == "sum of the squares of data\n", f"{kid}: task.txt is {task}")
        check(main_text(await a.py(kid, "secret")) == "'kept-in-memory'", f"{kid} lacks the parent's variables")
        answers[kid] = (name, int(main_text(await a.py(kid, code + "\nanswer"))))
    right = [kid for kid, (_, v) in answers.items() if v == RIGHT]
    check(len(right) == 1, f"expected one right answer ({RIGHT}), got {answers}")
    keep = right[0]
    check(answers[keep][0] == "generator", f"the wrong approach won: {answers}")
    for kid in kids:
        if kid != keep:
            await a.kill(kid)
    listed = await a.ok("list_sandboxes", {})
    ids = {s["sandbox_id"] for s in listed["sandboxes"]}
    check({sid, keep} <= ids, f"list_sandboxes lost the parent or the kept child: {sorted(ids)}")
    check(not (set(kids) - {keep}) & ids, f"killed children still listed: {sorted(ids)}")
    # The kept child carries on with its answer; the parent never saw one.
    check(main_text(await a.py(keep, "answer")) == str(RIGHT), "the kept child lost its answer")
    parent = await a.ok("run_code", {"code": "'answer' in globals()", "sandbox_id": sid})
    check(main_text(parent) == "False", "the parent sees a child's variable")
    await a.kill(keep)
    await a.kill(sid)


# ---------------------------------------------------------------------------------------------
# 5. pause-resume-job

TICK_S = 0.2


async def pause_resume_job(a):
    sid, home = await a.sandbox("pause-resume-job")
    counter = f"{home}/counter"
    loop = (f"i=0; while true; do i=$((i+1)); echo $i > {counter}.tmp && mv {counter}.tmp {counter}; "
            f"sleep {TICK_S}; done")
    bg = await a.sh(sid, loop, background=True)
    pid = bg["pid"]

    async def value():
        r = await a.call("read_file", {"path": counter, "sandbox_id": sid})
        if r.is_error:
            return None
        text = r.structured_content["content"].strip()
        return int(text) if text.isdigit() else None

    await until("the counter to reach 3", lambda: _at_least(value, 3), timeout_s=30)
    c0 = await value()
    t0 = time.monotonic()
    paused = await a.ok("pause", {"sandbox_id": sid})
    t_paused = time.monotonic()
    check(paused["sandbox"]["state"] == "paused", f"pause gave {paused['sandbox']['state']}")
    listed = await a.ok("list_sandboxes", {})
    state = {s["sandbox_id"]: s["state"] for s in listed["sandboxes"]}.get(sid)
    check(state == "paused", f"list_sandboxes says {state} after pause")
    await anyio.sleep(2.0)
    t_resume = time.monotonic()
    resumed = await a.ok("resume", {"sandbox_id": sid})
    check(resumed["sandbox"]["state"] == "running", f"resume gave {resumed['sandbox']['state']}")
    c1 = await value()
    t1 = time.monotonic()
    check(c1 is not None, "no counter after resume")
    # While the calls ran (pause, resume, the read) the loop may tick; while paused it must not.
    running_s = (t_paused - t0) + (t1 - t_resume)
    allowed = int(running_s / TICK_S) + 2
    growth = c1 - c0
    unpaused = int((t1 - t0) / TICK_S)
    check(growth <= allowed, f"counter grew {c0} -> {c1} over a {t1 - t0:.1f} s window of which only "
                             f"{running_s:.1f} s was not paused (allowed {allowed}, unpaused it would be ~{unpaused})")
    await anyio.sleep(1.0)
    c2 = await until(f"the counter to advance past {c1 + 1} after resume", lambda: _at_least(value, c1 + 2),
                     timeout_s=10)
    check(c2 >= c1 + 2, f"counter {c1} -> {c2} after resume")
    proc = await a.ok("read_process", {"pid": pid, "sandbox_id": sid})
    check(proc["running"], f"the loop is not running after resume: {proc}")
    await a.ok("kill_process", {"pid": pid, "sandbox_id": sid})
    a.note = f"paused-window growth {growth} (allowed {allowed}, unpaused ~{unpaused})"
    await a.kill(sid)


async def _at_least(value, n):
    v = await value()
    return v if v is not None and v >= n else None


# ---------------------------------------------------------------------------------------------
# 6. interactive-cli

CALC = '''import sys

print("calc ready; commands: add A B, mul A B, quit", flush=True)
n = 0
while True:
    try:
        line = input("calc> ")
    except EOFError:
        print(f"bye after {n} commands", flush=True)
        sys.exit(0)
    parts = line.split()
    if not parts:
        continue
    n += 1
    op, args = parts[0], [float(x) for x in parts[1:]]
    if op == "add":
        print(f"= {sum(args):g}", flush=True)
    elif op == "mul":
        r = 1.0
        for x in args:
            r *= x
        print(f"= {r:g}", flush=True)
    else:
        print(f"unknown command {op!r}", file=sys.stderr, flush=True)
'''


async def interactive_cli(a):
    sid, home = await a.sandbox("interactive-cli")
    await a.ok("write_file", {"path": f"{home}/calc.py", "content": CALC, "sandbox_id": sid})
    bg = await a.sh(sid, f"exec python3 -u {home}/calc.py", background=True)
    pid = bg["pid"]
    offsets = {"stdout_offset": 0, "stderr_offset": 0}
    seen = {"stdout": "", "stderr": ""}

    async def read_new():
        r = await a.ok("read_process", {"pid": pid, "sandbox_id": sid, **offsets})
        offsets["stdout_offset"], offsets["stderr_offset"] = r["next_stdout_offset"], r["next_stderr_offset"]
        seen["stdout"] += r["stdout"]
        seen["stderr"] += r["stderr"]
        return r

    async def wait_for(stream, text, what):
        async def probe():
            r = await read_new()
            if text in seen[stream]:
                return r
            check(r["running"], f"calc exited while waiting for {what}: {r}, seen {seen}")
            return None
        r = await until(what, probe, timeout_s=30)
        at = seen[stream].index(text) + len(text)
        seen[stream] = seen[stream][at:]
        return r

    await wait_for("stdout", "calc> ", "the first prompt")
    for line, answer in (("add 2 3", "= 5"), ("mul 6 7", "= 42"), ("add 0.5 0.25 1", "= 1.75")):
        w = await a.ok("write_process", {"pid": pid, "input": line + "\n", "sandbox_id": sid})
        check(w["pid"] == pid, f"write_process gave {w}")
        await wait_for("stdout", answer + "\n", f"the answer to {line!r}")
        await wait_for("stdout", "calc> ", f"the prompt after {line!r}")
    await a.ok("write_process", {"pid": pid, "input": "frobnicate 1\n", "sandbox_id": sid})
    await wait_for("stderr", "unknown command 'frobnicate'", "the error for an unknown command")
    await a.ok("write_process", {"pid": pid, "input": "", "close_stdin": True, "sandbox_id": sid})

    async def exited():
        r = await read_new()
        return r if not r["running"] else None

    done = await until("calc to exit after its stdin closed", exited, timeout_s=30)
    check(done["exit_code"] == 0, f"calc ended with {done}")
    check("bye after 4 commands" in seen["stdout"], f"no goodbye in {seen['stdout']!r}")
    # Input to a process that ended is refused, with a reason.
    late = await a.call("write_process", {"pid": pid, "input": "add 1 1\n", "sandbox_id": sid})
    check(late.is_error, f"write_process to an exited process succeeded: {late.structured_content}")
    await a.kill(sid)


# ---------------------------------------------------------------------------------------------

TASKS = {
    "data-analysis": data_analysis,
    "python-package": python_package,
    "web-service": web_service,
    "fork-explore": fork_explore,
    "pause-resume-job": pause_resume_job,
    "interactive-cli": interactive_cli,
}


async def run_all(engine, names, verbose):
    rows = []
    with tempfile.TemporaryDirectory(prefix="cat-", dir="/tmp") as state:
        os.chmod(state, 0o700)
        env = {**os.environ, "CAPSULE_STATE_DIR": state, "CAPSULE_ENGINE": engine, "CAPSULE_AGENT_BIN": AGENT,
               "CAPSULE_LOG": "capsule=warn"}
        params = StdioServerParameters(command=CAPSULE, args=["serve"], env=env)
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                # The server's first sandbox builds the engine's template in this fresh state dir
                # (a cold boot and a snapshot on kvm): done once here, so no task pays for it.
                warm = Agent(session, engine)
                t0 = time.monotonic()
                try:
                    made = await warm.ok("create_sandbox", {"name": "warm-up", "make_default": False})
                    await warm.ok("kill_sandbox", {"sandbox_id": made["sandbox"]["sandbox_id"]})
                except Failed as e:
                    rows.append(("(setup)", "FAIL", time.monotonic() - t0, warm.calls, f"no task can run: {e}"))
                    return rows
                print(f"  setup: first sandbox (template build) {time.monotonic() - t0:.1f} s", file=sys.stderr)
                rows.append(("(setup)", "-", time.monotonic() - t0, warm.calls, "first create_sandbox + kill"))
                for name in names:
                    a = Agent(session, engine)
                    a.note = ""
                    t0 = time.monotonic()
                    status, why = "pass", ""
                    try:
                        with anyio.fail_after(TASK_TIMEOUT_S):
                            await TASKS[name](a)
                    except Skip as e:
                        status, why = "skip", str(e)
                    except Failed as e:
                        status, why = "FAIL", str(e)
                    except TimeoutError:
                        status, why = "FAIL", f"task ran past {TASK_TIMEOUT_S} s"
                    except Exception as e:  # noqa: BLE001 - a broken task is a failed task
                        status, why = "FAIL", f"{type(e).__name__}: {e}"
                        if verbose:
                            traceback.print_exc()
                    wall = time.monotonic() - t0
                    await a.cleanup()
                    rows.append((name, status, wall, a.calls, why or a.note))
                    print(f"  {name}: {status} ({wall:.1f} s, {a.calls} calls)", file=sys.stderr, flush=True)
        # `capsule serve` left its daemon running (it would exit once idle): stop it before its
        # state dir goes.
        subprocess.run([CAPSULE, "shutdown", "--state-dir", state], env=env, capture_output=True, timeout=120)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("kvm", "test"), default="kvm")
    parser.add_argument("--only", help="comma-separated task names: " + ", ".join(TASKS))
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of unexpected errors")
    args = parser.parse_args()
    names = list(TASKS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        sys.exit(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
    for path in (CAPSULE, AGENT):
        if not os.path.isfile(path):
            sys.exit(f"no binary at {path}: run `cargo build -p capsule -p capsule-agent` first")
    t0 = time.monotonic()
    rows = anyio.run(run_all, args.engine, names, args.verbose)
    total = time.monotonic() - t0
    print(f"\nagent tasks on the {args.engine} engine")
    print(f"| {'task':<17} | {'result':<6} | {'wall s':>6} | {'calls':>5} | note")
    print(f"|{'-' * 19}|{'-' * 8}|{'-' * 8}|{'-' * 7}|------")
    for name, status, wall, calls, note in rows:
        short = " ".join(note.split())
        short = short if len(short) <= 110 else short[:107] + "..."
        print(f"| {name:<17} | {status:<6} | {wall:>6.1f} | {calls:>5} | {short}")
    rows_tasks = [r for r in rows if r[0] != "(setup)" or r[1] == "FAIL"]
    passed = sum(r[1] == "pass" for r in rows_tasks)
    skipped = sum(r[1] == "skip" for r in rows_tasks)
    failed = [r for r in rows_tasks if r[1] == "FAIL"]
    print(f"\n{passed} passed, {skipped} skipped, {len(failed)} failed; total {total:.1f} s "
          f"(server start included), {sum(r[3] for r in rows)} tool calls")
    for name, _, _, _, why in failed:
        print(f"\nFAIL {name}: {why}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
