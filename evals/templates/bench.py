"""Template benchmark (an eval, not a test: it prints numbers and ratios, and fails only when
something does not work). Through `capsule serve` over stdio and the Python MCP SDK, on the KVM
engine, in one run:

1. `save_template` of a sandbox that holds a loaded data set: its time and the bytes it takes,
   against a `pause` (a snapshot) of the same sandbox;
2. a sandbox ready from the saved template against one from the built-in template:
   `create_sandbox` until it answers, then its first `run_command true`, p50 of N each,
   interleaved;
3. the first use of what the template holds (a set of standard-library modules imported and a
   data set built in the source sandbox): cold in a sandbox from the built-in template, warm
   in one from the saved template.

Run: `python3 evals/templates/bench.py [--n 5]` (a built image; uses the debug build of
`capsule` unless CAPSULE_BIN says otherwise; release numbers need CAPSULE_BIN pointing at the
release build).
"""

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

REPO = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
CAPSULE = os.environ.get("CAPSULE_BIN") or str(TARGET / "debug" / "capsule")
WARM = ("import asyncio, decimal, email.parser, http.client, sqlite3, unittest, xml.dom.minidom, "
        "statistics, fractions\nrows = [(i, i * i % 97) for i in range(300000)]")
FIRST_USE = WARM + "\nlen(rows)"


async def ok(s, name, args):
    r = await s.call_tool(name, args)
    if r.is_error:
        raise SystemExit(f"{name} failed: {r.content[0].text}")
    return r.structured_content


def ms(t0):
    return (time.perf_counter() - t0) * 1000


async def ready_ms(s, template):
    t0 = time.perf_counter()
    made = (await ok(s, "create_sandbox", {"template": template, "make_default": False}))["sandbox"]
    created = ms(t0)
    await ok(s, "run_command", {"command": "true", "sandbox_id": made["sandbox_id"]})
    return made["sandbox_id"], created, ms(t0)


async def first_use_ms(s, sid, code):
    t0 = time.perf_counter()
    await ok(s, "run_code", {"code": code, "sandbox_id": sid})
    return ms(t0)


async def bench(n):
    with tempfile.TemporaryDirectory(prefix="ctb-", dir="/tmp") as state:
        os.chmod(state, 0o700)
        env = {**os.environ, "CAPSULE_STATE_DIR": state, "CAPSULE_ENGINE": "kvm", "CAPSULE_LOG": "capsule=warn"}
        params = StdioServerParameters(command=CAPSULE, args=["serve"], env=env)
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as s:
                await s.initialize()
                await ok(s, "run_code", {"code": WARM})
                src = (await ok(s, "list_sandboxes", {}))["default_sandbox_id"]
                t0 = time.perf_counter()
                saved = await ok(s, "save_template", {"name": "bench"})
                save_ms = ms(t0)
                t0 = time.perf_counter()
                await ok(s, "pause", {"sandbox_id": src})
                pause_ms = ms(t0)
                snap_bytes = sum(f.stat().st_blocks * 512 for f in pathlib.Path(state, "sandboxes", src).rglob("*")
                                 if f.is_file() and f.name == "memory.bin")
                print(f"save_template: {save_ms:.0f} ms (server: {saved['duration_ms']} ms), "
                      f"{saved['template']['bytes'] / 2**20:.0f} MiB; pause of the same sandbox: {pause_ms:.0f} ms, "
                      f"its snapshots' memory files {snap_bytes / 2**20:.0f} MiB")
                base, user, base_first, user_first = [], [], [], []
                for _ in range(n):
                    for template, into, first in (("default", base, base_first), ("bench", user, user_first)):
                        sid, created, answered = await ready_ms(s, template)
                        into.append((created, answered))
                        first.append(await first_use_ms(s, sid, FIRST_USE if template == "default" else "len(rows)"))
                        await ok(s, "kill_sandbox", {"sandbox_id": sid})

                def p50(rows, i):
                    return statistics.median(r[i] for r in rows)

                print(f"create_sandbox answered, p50 of {n}: default {p50(base, 0):.0f} ms, saved template "
                      f"{p50(user, 0):.0f} ms ({p50(user, 0) / p50(base, 0):.2f}x)")
                print(f"first run_command true answered, from the create call: default {p50(base, 1):.0f} ms, "
                      f"saved template {p50(user, 1):.0f} ms ({p50(user, 1) / p50(base, 1):.2f}x)")
                cold, warm = statistics.median(base_first), statistics.median(user_first)
                print(f"first use of the imports and data set: cold {cold:.0f} ms, warm (from the template) "
                      f"{warm:.0f} ms ({cold / warm:.1f}x faster)")
                await ok(s, "kill_sandbox", {"sandbox_id": src})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5)
    args = parser.parse_args()
    if not os.path.exists(CAPSULE):
        sys.exit(f"no capsule binary at {CAPSULE}")
    anyio.run(bench, args.n)


if __name__ == "__main__":
    main()
