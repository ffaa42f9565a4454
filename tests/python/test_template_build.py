"""`capsule template build FILE`: a template from a TOML spec, built through the host's daemon
and used through the Python MCP SDK: its files, its run steps' results and (on KVM) its warm-up
are in every sandbox made from it, every client lists it, a rebuild with nothing changed does
nothing, and a failing step stops the build with its output, leaving no template behind (and an
older one of the name as it was). A pip step is a real-world check against the default package
index, skipped when it is unreachable."""

import os
import subprocess
import textwrap
import time

import anyio
import pytest

import scenarios
from conftest import capsule_bin, server_env, shutdown_daemon
from scenarios import ok
from test_templates import session_as


def build(state_dir, engine, spec_dir, text):
    path = os.path.join(spec_dir, "spec.toml")
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    started = time.monotonic()
    done = subprocess.run([capsule_bin(), "template", "build", path], capture_output=True, text=True, timeout=900,
                          env=server_env(state_dir, engine))
    return done, time.monotonic() - started


SPEC = """\
    name = "built"
    description = "a file, a step's output and a warm variable"
    files = [{ from = "greeting.txt", to = "/tmp/capsule-spec-greeting.txt" }]
    run = ["mv /tmp/capsule-spec-greeting.txt greeting.txt", "echo step-ran > step.txt"]
    env = { BUILD_FLAVOUR = "spec" }
    warm = "import json\\nwarmed = json.dumps({'ok': True})"
    """


def test_a_spec_builds_a_template_every_client_uses_and_a_rebuild_is_instant(state_dir, engine, tmp_path):
    (tmp_path / "greeting.txt").write_text("hello from the spec\n")
    done, took = build(state_dir, engine, tmp_path, SPEC)
    assert done.returncode == 0, done.stderr
    assert "[1/4] file: greeting.txt -> /tmp/capsule-spec-greeting.txt" in done.stderr and "[4/4] warm" in done.stderr, done.stderr
    assert "built template \"built\"" in done.stdout

    async def use(s):
        names = [t["name"] for t in (await ok(s, "list_templates", {}))["templates"]]
        assert names == ["default", "built"], names
        sid = (await ok(s, "create_sandbox", {"template": "built", "make_default": False}))["sandbox"]["sandbox_id"]
        r = await ok(s, "run_command", {"command": "cat greeting.txt step.txt; echo $BUILD_FLAVOUR", "sandbox_id": sid})
        assert r["stdout"] == "hello from the spec\nstep-ran\nspec\n", "the files, and the spec's env"
        if engine == "kvm":
            assert await scenarios.code_value(s, "warmed", sandbox_id=sid) == "'{\"ok\": true}'"
        await ok(s, "kill_sandbox", {"sandbox_id": sid})

    anyio.run(session_as, state_dir, engine, use, "some-other-client")

    again, quick = build(state_dir, engine, tmp_path, SPEC)
    assert again.returncode == 0 and "up to date" in again.stdout, again.stdout + again.stderr
    assert quick < took, (quick, took)
    shutdown_daemon(state_dir)


def test_a_failing_step_saves_nothing_and_keeps_the_older_template(state_dir, tmp_path):
    (tmp_path / "greeting.txt").write_text("first\n")  # the test engine's sandboxes are host processes
    first, _ = build(state_dir, "test", tmp_path, SPEC)
    assert first.returncode == 0, first.stderr
    failing = SPEC.replace('"echo step-ran > step.txt"', '"echo about to fail; exit 7"')
    done, _ = build(state_dir, "test", tmp_path, failing)
    assert done.returncode != 0
    assert "FAILED (exit code 7)" in done.stderr and "| about to fail" in done.stderr, done.stderr
    listed = subprocess.run([capsule_bin(), "template", "list", "--json"], capture_output=True, text=True,
                            env=server_env(state_dir))
    assert '"built"' in listed.stdout, "the older template is still there"

    async def no_build_sandbox_left(s):
        assert (await ok(s, "list_sandboxes", {}))["sandboxes"] == []

    anyio.run(session_as, state_dir, "test", no_build_sandbox_left, "capsule-template-build")
    shutdown_daemon(state_dir)


def test_a_pip_step_installs_from_the_package_index(state_dir, tmp_path):
    from conftest import skip_without_kvm
    skip_without_kvm()
    spec = """\
        name = "with-pip"
        pip = ["tabulate"]
        warm = "import tabulate"
        """
    done, _ = build(state_dir, "kvm", tmp_path, spec)
    if done.returncode != 0 and any(s in done.stderr for s in ("Failed to establish", "Temporary failure", "No matching",
                                                               "Could not find", "Network is unreachable",
                                                               "No address associated")):
        why = [line.strip() for line in done.stderr.splitlines() if "Error" in line or "ERROR" in line]
        pytest.skip(f"the package index is unreachable from the sandbox: {' / '.join(why[-2:])[-300:]}")
    assert done.returncode == 0, done.stderr

    async def use(s):
        sid = (await ok(s, "create_sandbox", {"template": "with-pip", "make_default": False}))["sandbox"]["sandbox_id"]
        assert await scenarios.code_value(s, "tabulate.__name__", sandbox_id=sid) == "'tabulate'"
        await ok(s, "kill_sandbox", {"sandbox_id": sid})

    anyio.run(session_as, state_dir, "kvm", use)
    shutdown_daemon(state_dir)
