"""Chaos eval: several MCP clients use one host's capsule daemon while a separate task sends
`kill -9` at random moments to the daemon, to the clients' relays (`capsule serve`) and to VM
workers. After each round the invariants are checked:

1. every sandbox that was not killed on purpose (a kill_sandbox sent, even one whose answer was
   lost to a fault) is usable, with its last acknowledged state;
   only a sandbox whose worker was killed may come back older, at a snapshot it had, and then a
   tool result must have said so; one whose worker was killed before it had any snapshot is
   `failed`, saying it has none, and must come back with `restart_sandbox` (counted as
   restarted: its interpreter state is lost, its files kept);
2. the registry agrees with the live workers (one worker per running KVM sandbox, none else);
3. no worker, socket or sandbox directory is left over once every sandbox is killed.

Run (not part of the default test run; it takes minutes):

    python3 evals/chaos/chaos.py [--engine kvm|test] [--rounds 5] [--clients 3] [--round-s 20]

It uses the official Python MCP SDK (tests/python/requirements.txt) and the debug build of
`capsule` (`CAPSULE_BIN` overrides). Prints a table of rounds, faults injected and survived, and
exits non-zero when an invariant broke.
"""

import argparse
import json
import os
import pathlib
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import anyio
import mcp.types as types
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

REPO = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
CAPSULE = os.environ.get("CAPSULE_BIN") or str(TARGET / "debug" / "capsule")
AGENT = os.environ.get("CAPSULE_AGENT_BIN") or str(pathlib.Path(CAPSULE).parent / "capsule-agent")


class Broken(Exception):
    """An invariant broke."""


def env_for(state_dir, engine):
    env = dict(os.environ)
    env.update({"CAPSULE_STATE_DIR": state_dir, "CAPSULE_ENGINE": engine, "CAPSULE_AGENT_BIN": AGENT,
                "CAPSULE_LOG": "capsule=info"})
    return env


def pids_of(pattern, state_dir):
    """Processes whose command line matches `pattern` and whose environment names `state_dir`."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    found = []
    for pid in map(int, out):
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
        if f"CAPSULE_STATE_DIR={state_dir}\0".encode() in environ:
            found.append(pid)
    return found


def daemon_pid(state_dir):
    try:
        pid = int(open(os.path.join(state_dir, "daemon.lock")).read().strip())
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        return None if state in ("Z", "X") else pid
    except (OSError, ValueError, IndexError):
        return None


class Sandbox:
    """What a client knows of one of its sandboxes."""

    def __init__(self, sid, value, snapshots):
        self.sid = sid
        self.value = value          # the last acknowledged value of v
        # Values of `v = …` cells sent since that acknowledgement whose answer never came (the
        # relay or daemon was killed mid-call): the cell may still have run in the guest, so v
        # may be one of them. That is not lost state; an older value would be.
        self.unacknowledged = set()
        self.snapshots = set(snapshots)  # values of v some snapshot of it holds
        self.rolled_back_told = False
        # A kill_sandbox was sent whose answer never came: the sandbox may be gone, on purpose.
        self.kill_sent = False


class Client:
    def __init__(self, name, state_dir, engine, stats):
        self.name, self.state_dir, self.engine, self.stats = name, state_dir, engine, stats
        self.sandboxes: dict[str, Sandbox] = {}
        self.counter = 0

    def params(self):
        return StdioServerParameters(command=CAPSULE, args=["serve"], env=env_for(self.state_dir, self.engine))

    async def call(self, session, tool, args):
        result = await session.call_tool(tool, args)
        text = " ".join(c.text for c in result.content if c.type == "text")
        if "rolled back" in text:
            for sb in self.sandboxes.values():
                if args.get("sandbox_id") == sb.sid or sb.sid in text:
                    sb.rolled_back_told = True
        return result, text

    async def value_of(self, session, sb):
        result, text = await self.call(session, "run_code", {"code": "v", "sandbox_id": sb.sid})
        if result.is_error:
            return None, text
        mains = [r["text"] for r in result.structured_content["results"] if r.get("is_main_result")]
        return (int(mains[0]) if mains else None), text

    async def step(self, session):
        """One random operation, with the client's model of its sandboxes kept up to date."""
        self.counter += 1
        op = random.choice(["set", "set", "set", "pause", "resume", "fork", "create", "kill"])
        if op == "create" or not self.sandboxes:
            if len(self.sandboxes) >= 3:
                op = "set"
            else:
                r, text = await self.call(session, "create_sandbox", {"memory_mib": 512})
                if not r.is_error:
                    sid = r.structured_content["sandbox"]["sandbox_id"]
                    r, text = await self.call(session, "run_code", {"code": f"v = {self.counter}", "sandbox_id": sid})
                    if not r.is_error:
                        self.sandboxes[sid] = Sandbox(sid, self.counter, [])
                    else:
                        await self.call(session, "kill_sandbox", {"sandbox_id": sid})
                return
        sb = random.choice(list(self.sandboxes.values()))
        if op == "set":
            sb.unacknowledged.add(self.counter)
            r, _ = await self.call(session, "run_code", {"code": f"v = {self.counter}", "sandbox_id": sb.sid})
            if not r.is_error:
                sb.value = self.counter
                sb.unacknowledged.clear()
        elif op == "pause":
            r, _ = await self.call(session, "pause", {"sandbox_id": sb.sid})
            if not r.is_error:
                sb.snapshots.add(sb.value)
        elif op == "resume":
            await self.call(session, "resume", {"sandbox_id": sb.sid})
        elif op == "fork" and len(self.sandboxes) < 3 and self.engine == "kvm":
            # (The test engine's forks copy files only, not the interpreter's variables.)
            r, _ = await self.call(session, "fork", {"sandbox_id": sb.sid})
            if not r.is_error:
                sb.snapshots.add(sb.value)
                for child in r.structured_content["sandboxes"]:
                    self.sandboxes[child["sandbox_id"]] = Sandbox(child["sandbox_id"], sb.value, [sb.value])
        elif op == "kill":
            sb.kill_sent = True
            r, _ = await self.call(session, "kill_sandbox", {"sandbox_id": sb.sid})
            if not r.is_error:
                del self.sandboxes[sb.sid]

    async def run_until(self, deadline):
        """Steps until `deadline`, reconnecting whenever the relay or the daemon goes."""
        while time.monotonic() < deadline:
            try:
                info = types.Implementation(name=self.name, version="1")
                async with stdio_client(self.params()) as (read, write):
                    async with ClientSession(read, write, client_info=info, read_timeout_seconds=120) as session:
                        await session.initialize()
                        while time.monotonic() < deadline:
                            await self.step(session)
                            self.stats["calls"] += 1
            except BaseException as e:  # a killed relay or daemon breaks the session: reconnect
                if isinstance(e, (KeyboardInterrupt, Broken)):
                    raise
                self.stats["reconnects"] += 1
                await anyio.sleep(0.2)

    async def check(self, session, killed_workers):
        """Invariant 1 for every sandbox of this client."""
        for sb in list(self.sandboxes.values()):
            value, text = await self.value_of(session, sb)
            if value is None and "rolled back" in text:
                # The rollback was reported on this very call; the next one runs on the snapshot.
                sb.rolled_back_told = True
                value, text = await self.value_of(session, sb)
            if value == sb.value:
                continue
            if value is None and sb.kill_sent and f'no sandbox "{sb.sid}"' in text:
                del self.sandboxes[sb.sid]  # killed on purpose; the answer was lost to a fault
                continue
            if value in sb.unacknowledged:
                sb.value = value
                sb.unacknowledged.clear()
                continue
            if value in sb.snapshots and sb.rolled_back_told and killed_workers:
                sb.value = value
                continue
            if value is None and killed_workers and not sb.snapshots and "no snapshot to roll back to" in text:
                # Its VM was lost before any snapshot of its own: it is `failed`, saying so, and
                # restart_sandbox boots it again on its disk (its interpreter state is gone).
                r, restarted = await self.call(session, "restart_sandbox", {"sandbox_id": sb.sid})
                self.counter += 1
                r2, _ = await self.call(session, "run_code", {"code": f"v = {self.counter}", "sandbox_id": sb.sid})
                if r.is_error or r2.is_error:
                    raise Broken(f"{self.name}'s sandbox {sb.sid} failed without a snapshot and did not restart: "
                                 f"{restarted}")
                sb.value, sb.rolled_back_told = self.counter, False
                sb.unacknowledged.clear()
                self.stats["restarted"] += 1
                continue
            raise Broken(f"{self.name}'s sandbox {sb.sid}: v = {value!r}, expected {sb.value} "
                         f"(snapshots {sorted(sb.snapshots)}, rollback told: {sb.rolled_back_told}): {text}")


async def inject_faults(state_dir, deadline, stats):
    while time.monotonic() < deadline:
        await anyio.sleep(random.uniform(0.5, 3.0))
        if time.monotonic() >= deadline:
            return
        kind = random.choice(["daemon", "relay", "relay", "worker"])
        targets = {
            "daemon": [p for p in [daemon_pid(state_dir)] if p],
            "relay": pids_of("capsule serve", state_dir),
            "worker": pids_of("capsule worker", state_dir),
        }[kind]
        if not targets:
            continue
        try:
            os.kill(random.choice(targets), signal.SIGKILL)
            stats["faults"][kind] += 1
        except ProcessLookupError:
            pass


def registry_states(state_dir):
    db = sqlite3.connect(os.path.join(state_dir, "registry.sqlite3"))
    return dict(db.execute("SELECT id, state FROM sandboxes WHERE state NOT IN ('deleted')").fetchall())


async def check_round(clients, state_dir, engine, killed_workers):
    """Invariants 1 and 2, through a fresh client per owner."""
    for client in clients:
        info = types.Implementation(name=client.name, version="1")
        async with stdio_client(client.params()) as (read, write):
            async with ClientSession(read, write, client_info=info, read_timeout_seconds=120) as session:
                await session.initialize()
                await client.check(session, killed_workers)
    if engine == "kvm":
        running = [sid for sid, st in registry_states(state_dir).items() if st == "running"]
        workers = pids_of("capsule worker", state_dir)
        if len(workers) != len(running):
            raise Broken(f"{len(workers)} workers for {len(running)} running sandboxes ({running})")


async def final_cleanup(clients, state_dir):
    """Invariant 3: after killing every sandbox, nothing is left."""
    for client in clients:
        info = types.Implementation(name=client.name, version="1")
        async with stdio_client(client.params()) as (read, write):
            async with ClientSession(read, write, client_info=info, read_timeout_seconds=120) as session:
                await session.initialize()
                listed = (await session.call_tool("list_sandboxes", {})).structured_content["sandboxes"]
                for s in listed:
                    await session.call_tool("kill_sandbox", {"sandbox_id": s["sandbox_id"]})
    subprocess.run([CAPSULE, "shutdown", "--state-dir", state_dir], capture_output=True, timeout=300)
    time.sleep(1)
    left = pids_of("capsule (worker|daemon)", state_dir)
    if left:
        raise Broken(f"processes left over: {left}")
    sandboxes = pathlib.Path(state_dir) / "sandboxes"
    dirs = [p.name for p in sandboxes.iterdir() if not p.name.startswith(".")] if sandboxes.exists() else []
    if dirs:
        raise Broken(f"sandbox directories left over: {dirs}")
    if (pathlib.Path(state_dir) / "capsule.sock").exists():
        raise Broken("the daemon's socket was left over")


def first_broken(e):
    """The `Broken` in `e` (or in the exception groups around it), if any."""
    if isinstance(e, Broken):
        return e
    for inner in getattr(e, "exceptions", ()):
        found = first_broken(inner)
        if found:
            return found
    return None


async def main(args):
    state = tempfile.mkdtemp(prefix="cpsc-", dir="/tmp")
    os.chmod(state, 0o700)
    stats = {"calls": 0, "reconnects": 0, "restarted": 0, "faults": {"daemon": 0, "relay": 0, "worker": 0}}
    clients = [Client(f"chaos-{i}", state, args.engine, stats) for i in range(args.clients)]
    rows = []
    broke = None
    try:
        for round_no in range(1, args.rounds + 1):
            before = dict(stats["faults"])
            deadline = time.monotonic() + args.round_s
            async with anyio.create_task_group() as tg:
                for client in clients:
                    tg.start_soon(client.run_until, deadline)
                tg.start_soon(inject_faults, state, deadline, stats)
            injected = {k: stats["faults"][k] - before[k] for k in before}
            await check_round(clients, state, args.engine, injected["worker"] > 0 or before["worker"] > 0)
            rows.append((round_no, injected, sum(len(c.sandboxes) for c in clients)))
            print(f"round {round_no}: faults {injected}, sandboxes {rows[-1][2]}, calls so far {stats['calls']}, "
                  f"reconnects {stats['reconnects']}: invariants hold", flush=True)
        await final_cleanup(clients, state)
    except Exception as e:  # noqa: BLE001 - an invariant may come wrapped in the SDK's task groups
        broke = first_broken(e)
        if broke is None:
            raise
    finally:
        subprocess.run([CAPSULE, "shutdown", "--state-dir", state], capture_output=True, timeout=300)
        for pid in pids_of("capsule (worker|daemon)", state):
            os.kill(pid, signal.SIGKILL)
    total = stats["faults"]
    print("\n| round | daemon kills | relay kills | worker kills | sandboxes alive |")
    print("|---|---|---|---|---|")
    for round_no, f, alive in rows:
        print(f"| {round_no} | {f['daemon']} | {f['relay']} | {f['worker']} | {alive} |")
    survived = sum(total.values()) if broke is None else f"all but the last round's ({broke})"
    print(f"\n{len(rows)} rounds, {stats['calls']} tool calls, {stats['reconnects']} client reconnects; "
          f"faults injected: {total}; survived: {survived}; restarted without a snapshot: {stats['restarted']}")
    if broke:
        print(f"INVARIANT BROKEN: {broke}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="kvm", choices=["kvm", "test"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--round-s", type=float, default=20.0)
    anyio.run(main, parser.parse_args())
