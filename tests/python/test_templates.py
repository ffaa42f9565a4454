"""Templates saved by the model (`save_template`), through the official Python MCP SDK against
a real `capsule serve`: a sandbox's state becomes a template, new sandboxes start from it with
its files (and, on KVM, its Python variables and running processes), `list_templates` and the
MCP resources show it, bad names and sizes are refused with what to do, it survives a server
restart, and `capsule template rm` refuses a template in use unless forced, after which the
sandboxes made from it keep working."""

import json
import subprocess

import anyio

import scenarios
from conftest import capsule_bin, server_env, shutdown_daemon
from mcp import ClientSession
from mcp.client.stdio import stdio_client
from mcp.types import Implementation
from scenarios import ok
from test_stdio import params


async def session_as(state_dir, engine, body, name="templates-test", **env):
    p = params(state_dir, engine)
    if env:
        p.env.update(env)
    async with stdio_client(p) as (read, write):
        async with ClientSession(read, write, client_info=Implementation(name=name, version="1")) as session:
            await session.initialize()
            return await body(session)


def cli(state_dir, *args):
    return subprocess.run([capsule_bin(), "template", *args], capture_output=True, text=True, timeout=60,
                          env=server_env(state_dir))


def test_a_saved_template_starts_sandboxes_with_its_state_and_outlives_the_server(state_dir, engine):
    kvm = engine == "kvm"

    async def save(s):
        await ok(s, "run_command", {"command": "echo prepared > data.txt"})
        await ok(s, "run_code", {"code": "model = {'weights': [1, 2, 3]}"})
        if kvm:
            await ok(s, "run_command", {"command": "sleep 1000", "background": True})
        saved = await ok(s, "save_template", {"name": "prepared", "description": "data.txt and a model"})
        t = saved["template"]
        assert t["name"] == "prepared" and t["base"] == "default" and not t["builtin"]
        assert t["bytes"] > 0 and saved["duration_ms"] >= 0
        # The source sandbox is left as it was.
        assert await scenarios.code_value(s, "model['weights'][2]") == "3"
        listed = (await ok(s, "list_templates", {}))["templates"]
        assert [x["name"] for x in listed] == ["default", "prepared"]
        assert listed[0]["builtin"]
        resources = (await s.list_resources()).resources
        assert {str(r.uri) for r in resources} == {"capsule://templates/default", "capsule://templates/prepared"}
        read = await s.read_resource("capsule://templates/prepared")
        assert json.loads(read.contents[0].text)["description"] == "data.txt and a model"

        made = (await ok(s, "create_sandbox", {"template": "prepared", "make_default": False}))["sandbox"]
        assert made["template"] == "prepared" and made["memory_mib"] == t["memory_mib"]
        sid = made["sandbox_id"]
        r = await ok(s, "run_command", {"command": "cat data.txt", "sandbox_id": sid})
        assert r["stdout"] == "prepared\n"
        if kvm:
            assert await scenarios.code_value(s, "model['weights']", sandbox_id=sid) == "[1, 2, 3]"
            r = await ok(s, "run_command", {"command": "pgrep -x sleep | wc -l", "sandbox_id": sid})
            assert r["stdout"].strip() == "1", "the template's background process runs in the new sandbox"
        listing = (await ok(s, "list_sandboxes", {}))["sandboxes"]
        assert {x["sandbox_id"]: x["template"] for x in listing}[sid] == "prepared"
        return sid

    made = anyio.run(session_as, state_dir, engine, save)
    shutdown_daemon(state_dir)

    async def after_restart(s):
        listed = (await ok(s, "list_templates", {}))["templates"]
        assert [x["name"] for x in listed] == ["default", "prepared"]
        again = (await ok(s, "create_sandbox", {"template": "prepared", "make_default": False}))["sandbox"]
        r = await ok(s, "run_command", {"command": "cat data.txt", "sandbox_id": again["sandbox_id"]})
        assert r["stdout"] == "prepared\n"
        await ok(s, "kill_sandbox", {"sandbox_id": again["sandbox_id"]})

    anyio.run(session_as, state_dir, engine, after_restart)

    # The CLI lists it, and refuses to remove it while a sandbox made from it lives.
    listed = json.loads(cli(state_dir, "list", "--json").stdout)
    assert [t["name"] for t in listed] == ["prepared"]
    refused = cli(state_dir, "rm", "prepared")
    assert refused.returncode != 0 and made in refused.stderr and "--force" in refused.stderr, refused.stderr
    forced = cli(state_dir, "rm", "prepared", "--force")
    assert forced.returncode == 0, forced.stderr

    async def after_rm(s):
        r = await ok(s, "run_command", {"command": "cat data.txt", "sandbox_id": made})
        assert r["stdout"] == "prepared\n", "a sandbox made from a removed template keeps working"
        res = await s.call_tool("create_sandbox", {"template": "prepared"})
        assert res.is_error and "unknown template" in res.content[0].text and "default" in res.content[0].text
        await ok(s, "kill_sandbox", {"sandbox_id": made})

    anyio.run(session_as, state_dir, engine, after_rm)
    shutdown_daemon(state_dir)


def test_bad_template_requests_are_refused_with_what_to_do(state_dir):
    async def body(s):
        await ok(s, "run_command", {"command": "true"})
        for name, says in [("Bad Name", "a-z"), ("default", "built-in"), ("x" * 65, "1 to 64")]:
            res = await s.call_tool("save_template", {"name": name})
            assert res.is_error and says in res.content[0].text, res.content[0].text
        await ok(s, "save_template", {"name": "once"})
        res = await s.call_tool("save_template", {"name": "once"})
        assert res.is_error and "exists already" in res.content[0].text
        res = await s.call_tool("create_sandbox", {"template": "nope"})
        assert res.is_error and "the templates are: default, once" in res.content[0].text
        res = await s.call_tool("create_sandbox", {"template": "once", "memory_mib": 2048})
        assert res.is_error and "memory_mib=2048 does not fit" in res.content[0].text
        # Another client does not see this one's template.
        async def other(o):
            names = [t["name"] for t in (await ok(o, "list_templates", {}))["templates"]]
            assert names == ["default"]
            res = await o.call_tool("create_sandbox", {"template": "once"})
            assert res.is_error and "unknown template" in res.content[0].text

        await session_as(state_dir, "test", other, name="another-client")

    anyio.run(session_as, state_dir, "test", body)
    shutdown_daemon(state_dir)


def test_saving_templates_can_be_disabled(state_dir):
    async def body(s):
        await ok(s, "run_command", {"command": "true"})
        res = await s.call_tool("save_template", {"name": "t"})
        assert res.is_error and "disabled" in res.content[0].text, res.content[0].text

    anyio.run(lambda: session_as(state_dir, "test", body, CAPSULE_MAX_SAVED_TEMPLATES="0"))
    shutdown_daemon(state_dir)
