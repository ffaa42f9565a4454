"""A hostile guest, through `capsule serve` over stdio and the official Python MCP SDK, on real
microVMs: a fork bomb is stopped and named, a memory hog is killed without taking the agent
with it, an agent starved for good marks its sandbox unresponsive (every later call fails fast,
naming `restart_sandbox`), and `restart_sandbox` brings it back with its files. Interactive
input (`write_process`, a pty) runs on both engines."""

import time

import anyio

import json

from conftest import skip_without_kvm
from scenarios import ok
from test_stdio import session_run


def structured(result):
    return result.structured_content


def all_text(result):
    return "\n".join(c.text for c in result.content if getattr(c, "text", None))


async def with_neighbour(session):
    """A second sandbox with a Python variable and a file, to check that nothing done in the
    first reaches it."""
    made = await ok(session, "create_sandbox", {})
    sid = made["sandbox"]["sandbox_id"]
    await ok(session, "run_code", {"sandbox_id": sid, "code": "neighbour = 41 + 1"})
    await ok(session, "write_file", {"sandbox_id": sid, "path": "/root/n.txt", "content": "n"})
    return sid


async def neighbour_still_fine(session, sid):
    started = time.monotonic()
    value = await ok(session, "run_code", {"sandbox_id": sid, "code": "neighbour"})
    assert "42" in json.dumps(value), value
    got = await ok(session, "read_file", {"sandbox_id": sid, "path": "/root/n.txt"})
    assert got["content"] == "n"
    assert time.monotonic() - started < 10, "the neighbour answers at once"


def test_a_fork_bomb_is_stopped_named_and_the_sandbox_keeps_answering(state_dir):
    skip_without_kvm()

    async def body(session):
        neighbour = await with_neighbour(session)
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
        print(f"fork bomb: stopped after {took:.2f} s; `echo` answered {time.monotonic() - started:.2f} s after it began")
        await neighbour_still_fine(session, neighbour)

    anyio.run(lambda: session_run(state_dir, body, engine="kvm"))


def test_a_memory_hog_is_killed_and_the_agent_lives(state_dir):
    skip_without_kvm()

    async def body(session):
        neighbour = await with_neighbour(session)
        made = await ok(session, "create_sandbox", {"memory_mib": 256})
        sid = made["sandbox"]["sandbox_id"]
        await ok(session, "run_code", {"sandbox_id": sid, "code": "kept = 'still here'"})
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
        value = await ok(session, "run_code", {"sandbox_id": sid, "code": "kept"})
        assert "still here" in json.dumps(value), value
        await neighbour_still_fine(session, neighbour)

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


def test_escaping_background_children_die_with_kill_process(state_dir):
    skip_without_kvm()

    async def body(session):
        made = await ok(session, "create_sandbox", {})
        sid = made["sandbox"]["sandbox_id"]
        loop = await ok(
            session,
            "run_command",
            {"sandbox_id": sid, "command": "while true; do setsid sleep 300 & sleep 0.2; done", "background": True},
        )
        await anyio.sleep(2)
        many = await ok(session, "run_command", {"sandbox_id": sid, "command": "pgrep -c -x sleep"})
        assert int(many["stdout"]) >= 5, many
        await ok(session, "kill_process", {"sandbox_id": sid, "pid": loop["pid"]})
        await anyio.sleep(0.5)
        left = await session.call_tool("run_command", {"sandbox_id": sid, "command": "pgrep -a -x sleep; true"})
        assert structured(left)["stdout"] == "", f"escaped children survived: {structured(left)['stdout']}"

    anyio.run(lambda: session_run(state_dir, body, engine="kvm"))


def test_a_fork_bomb_in_a_cell_kills_that_context_only(state_dir):
    skip_without_kvm()

    async def body(session):
        made = await ok(session, "create_sandbox", {"pids_max": 128})
        sid = made["sandbox"]["sandbox_id"]
        await ok(session, "run_code", {"sandbox_id": sid, "code": "x = 'other context'", "context": "other"})
        await ok(session, "run_code", {"sandbox_id": sid, "code": "y = 1", "context": "bomb"})
        bomb = await session.call_tool(
            "run_code",
            {"sandbox_id": sid, "context": "bomb", "timeout_s": 120,
             "code": "import os\nwhile True:\n    os.fork()"},
        )
        assert bomb.is_error, all_text(bomb)
        assert "pids limit" in all_text(bomb), all_text(bomb)
        other = await ok(session, "run_code", {"sandbox_id": sid, "code": "x", "context": "other"})
        assert "other context" in json.dumps(other), other
        fresh = await session.call_tool("run_code", {"sandbox_id": sid, "code": "y", "context": "bomb"})
        assert "NameError" in all_text(fresh), f"the bombed context restarted fresh: {all_text(fresh)}"
        again = await ok(session, "run_code", {"sandbox_id": sid, "code": "2 + 2", "context": "bomb"})
        assert "4" in json.dumps(again)

    anyio.run(lambda: session_run(state_dir, body, engine="kvm"))


def test_a_full_disk_gives_clear_errors_and_recovers_after_rm(state_dir):
    skip_without_kvm()

    async def body(session):
        made = await ok(session, "create_sandbox", {"disk_mib": 256})
        sid = made["sandbox"]["sandbox_id"]
        fill = await session.call_tool(
            "run_command", {"sandbox_id": sid, "command": "dd if=/dev/zero of=/root/fill bs=1M", "timeout_s": 300}
        )
        assert structured(fill)["exit_code"] != 0
        assert "No space left on device" in structured(fill)["stderr"], structured(fill)
        full = await session.call_tool("write_file", {"sandbox_id": sid, "path": "/root/more.bin", "content": "x" * (1 << 20)})
        assert full.is_error and "space" in all_text(full).lower(), all_text(full)
        await ok(session, "run_command", {"sandbox_id": sid, "command": "rm /root/fill"})
        await ok(session, "write_file", {"sandbox_id": sid, "path": "/root/more.txt", "content": "fits"})
        got = await ok(session, "read_file", {"sandbox_id": sid, "path": "/root/more.txt"})
        assert got["content"] == "fits"

    anyio.run(lambda: session_run(state_dir, body, engine="kvm"))


def test_an_output_flood_on_both_streams_is_capped_with_the_full_streams_in_files(state_dir):
    skip_without_kvm()

    async def body(session):
        flood = await ok(
            session,
            "run_command",
            {"command": "yes out | head -c 50000000 & yes err | head -c 50000000 >&2; wait", "timeout_s": 300},
        )
        assert flood["exit_code"] == 0, flood
        assert len(flood["stdout"]) < 1_000_000 and len(flood["stderr"]) < 1_000_000
        streams = {t["stream"]: t for t in flood["truncated"]}
        assert set(streams) == {"stdout", "stderr"}, flood["truncated"]
        for name, cut in streams.items():
            size = await ok(session, "run_command", {"command": f"wc -c < {cut['full_output_path']}"})
            assert int(size["stdout"]) == 50_000_000, (name, size)

    anyio.run(lambda: session_run(state_dir, body, engine="kvm"))
