"""A hostile guest, through `capsule serve` over stdio and the official Python MCP SDK, on real
microVMs: a fork bomb is stopped and named, a memory hog is killed without taking the agent
with it, an agent starved for good marks its sandbox unresponsive (every later call fails fast,
naming `restart_sandbox`), and `restart_sandbox` brings it back with its files. Interactive
input (`write_process`, a pty) runs on both engines."""

import time

import anyio

from conftest import skip_without_kvm
from scenarios import ok
from test_stdio import session_run


def structured(result):
    return result.structured_content


def all_text(result):
    return "\n".join(c.text for c in result.content if getattr(c, "text", None))


def test_a_fork_bomb_is_stopped_named_and_the_sandbox_keeps_answering(state_dir):
    skip_without_kvm()

    async def body(session):
        made = await ok(session, "create_sandbox", {"pids_max": 128})
        sid = made["sandbox"]["sandbox_id"]
        started = time.monotonic()
        bomb = await session.call_tool(
            "run_command", {"sandbox_id": sid, "command": "bomb() { bomb | bomb & }; bomb; sleep 5", "timeout_s": 120}
        )
        took = time.monotonic() - started
        result = structured(bomb)
        assert bomb.is_error, all_text(bomb)
        assert result["limit"] == {"kind": "pids", "max": 128}, result
        assert "pids limit" in all_text(bomb), all_text(bomb)
        assert took < 60, f"the bomb was stopped after {took:.1f} s"
        after = await ok(session, "run_command", {"sandbox_id": sid, "command": "echo alive; ls /proc | grep -c '^[0-9]'"})
        assert after["stdout"].startswith("alive\n"), after
        assert int(after["stdout"].split()[1]) < 128, f"the bomb's processes are gone: {after['stdout']}"

    anyio.run(lambda: session_run(state_dir, body, engine="kvm"))


def test_a_memory_hog_is_killed_and_the_agent_lives(state_dir):
    skip_without_kvm()

    async def body(session):
        made = await ok(session, "create_sandbox", {"memory_mib": 256})
        sid = made["sandbox"]["sandbox_id"]
        hog = await session.call_tool(
            "run_command",
            {
                "sandbox_id": sid,
                "command": "python3 -c 'a = []\nwhile True: a.append(bytearray(16 << 20))'",
                "timeout_s": 120,
            },
        )
        result = structured(hog)
        assert result["exit_code"] != 0 or result["signal"] == 9, result
        assert not result["timed_out"], result
        assert result["limit"] is not None and result["limit"]["kind"] == "memory", result
        assert "memory" in all_text(hog), all_text(hog)
        after = await ok(session, "run_command", {"sandbox_id": sid, "command": "echo alive"})
        assert after["stdout"] == "alive\n"

    anyio.run(lambda: session_run(state_dir, body, engine="kvm"))


def test_a_starved_agent_makes_its_sandbox_unresponsive_until_restart_sandbox(state_dir):
    skip_without_kvm()

    async def body(session):
        made = await ok(session, "create_sandbox", {})
        sid = made["sandbox"]["sandbox_id"]
        await ok(session, "write_file", {"sandbox_id": sid, "path": "/root/kept.txt", "content": "kept\n"})
        # The agent's own cgroup frozen from inside: the agent never answers again, yet the VM runs.
        frozen = await session.call_tool(
            "run_command",
            {"sandbox_id": sid, "command": "echo 1 > /sys/fs/cgroup/agent/cgroup.freeze; sleep 600", "timeout_s": 600},
        )
        assert frozen.is_error
        assert "unresponsive" in all_text(frozen) and "restart_sandbox" in all_text(frozen), all_text(frozen)
        listed = await ok(session, "list_sandboxes", {})
        assert [s["state"] for s in listed["sandboxes"] if s["sandbox_id"] == sid] == ["unresponsive"], listed

        started = time.monotonic()
        again = await session.call_tool("run_command", {"sandbox_id": sid, "command": "true"})
        assert again.is_error and "restart_sandbox" in all_text(again), all_text(again)
        assert time.monotonic() - started < 10, "a call on an unresponsive sandbox fails fast"

        restarted = await ok(session, "restart_sandbox", {"sandbox_id": sid})
        assert restarted["sandbox"]["state"] == "running", restarted
        assert "unresponsive" in restarted["note"], restarted
        back = await ok(session, "read_file", {"sandbox_id": sid, "path": "/root/kept.txt"})
        assert back["content"] == "kept\n", back
        echoed = await ok(session, "run_command", {"sandbox_id": sid, "command": "echo back"})
        assert echoed["stdout"] == "back\n"

    anyio.run(lambda: session_run(state_dir, body, engine="kvm"))


def test_write_process_answers_a_prompt_of_a_background_program(state_dir, engine):
    async def body(session):
        started = await ok(
            session,
            "run_command",
            {"command": "printf 'name? '; read name; echo \"hello $name\"", "background": True},
        )
        pid = started["pid"]
        await ok(session, "write_process", {"pid": pid, "input": "world\n"})
        deadline = time.monotonic() + 20
        while True:
            out = await ok(session, "read_process", {"pid": pid})
            if "hello world" in out["stdout"] or time.monotonic() > deadline:
                break
            await anyio.sleep(0.1)
        assert "hello world" in out["stdout"], out

    anyio.run(lambda: session_run(state_dir, body, engine=engine))
