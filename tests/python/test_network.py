"""Sandbox networking on real microVMs, through `capsule serve` over stdio and the official Python
MCP SDK. The test host is an HTTP server in a network namespace this test creates (a veth pair:
198.18.7.1 on the host's side, 198.18.7.2 in the namespace; 198.18.0.0/15 is a benchmarking
range, so the server's ceiling must allow it explicitly). Nothing outside this host is reached,
except by the one registry test, which skips when the host itself cannot reach the registry."""

import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import anyio
import pytest

from conftest import skip_without_kvm
from scenarios import ok
from test_stdio import session_run

HOST_SIDE, GUEST_SIDE, PORT = "198.18.7.1", "198.18.7.2", 8080
PAGE = "hello from the test host\n"


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture(scope="module")
def test_host():
    """An HTTP server in a network namespace of its own, reachable from the host at
    GUEST_SIDE:PORT; skips (saying why) where namespaces cannot be made."""
    if shutil.which("ip") is None:
        pytest.skip("network tests: `ip` (iproute2) is not installed")
    ns, veth = f"capt{os.getpid() % 100000}", f"cvt{os.getpid() % 100000}"
    steps = [
        ["netns", "add", ns],
        ["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
        ["addr", "add", f"{HOST_SIDE}/24", "dev", veth],
        ["link", "set", veth, "up"],
        ["-n", ns, "addr", "add", f"{GUEST_SIDE}/24", "dev", "eth0"],
        ["-n", ns, "link", "set", "eth0", "up"],
        ["-n", ns, "link", "set", "lo", "up"],
    ]
    for step in steps:
        done = _ip(*step)
        if done.returncode != 0:
            _ip("link", "del", veth)
            _ip("netns", "del", ns)
            pytest.skip(f"network tests: cannot make a test namespace (`ip {' '.join(step)}`: {done.stderr.strip()})")
    root = tempfile.mkdtemp(prefix="capnet-")
    pathlib.Path(root, "hello.txt").write_text(PAGE)
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, "python3", "-m", "http.server", str(PORT), "--bind", GUEST_SIDE],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        probe = subprocess.run(["python3", "-c", f"import socket; socket.create_connection(('{GUEST_SIDE}', {PORT}), 1)"],
                               capture_output=True)
        if probe.returncode == 0:
            break
        time.sleep(0.1)
    try:
        yield GUEST_SIDE
    finally:
        server.kill()
        server.wait()
        _ip("link", "del", veth)
        _ip("netns", "del", ns)
        shutil.rmtree(root, ignore_errors=True)


def config_file(state_dir, text):
    path = os.path.join(state_dir, "capsule.toml")
    pathlib.Path(path).write_text(text)
    return path


def run_with_config(state_dir, config_text, body):
    os.environ["CAPSULE_CONFIG"] = config_file(state_dir, config_text)
    try:
        anyio.run(lambda: session_run(state_dir, body, engine="kvm"))
    finally:
        del os.environ["CAPSULE_CONFIG"]


def text_of(result):
    return "\n".join(c.text for c in result.content if getattr(c, "text", None))


FETCH = f"curl -sS -m 10 http://{GUEST_SIDE}:{PORT}/hello.txt"
ALLOW_TEST_HOST = f'[network]\nmode = "public"\nallow = ["{GUEST_SIDE}/32"]\n'


def test_an_allowed_range_connects_and_private_and_host_addresses_are_refused_fast_and_named(state_dir, test_host):
    skip_without_kvm()

    async def body(session):
        got = await ok(session, "run_command", {"command": FETCH})
        assert got["stdout"] == PAGE, got
        listed = await ok(session, "list_sandboxes", {})
        assert listed["sandboxes"][0]["network"] == "public", listed

        for target, why in [(f"10.1.2.3:5432", "private"), (f"{HOST_SIDE}:{PORT}", "host")]:
            started = time.monotonic()
            refused = await session.call_tool("run_command", {"command": f"curl -sS -m 10 http://{target}/"})
            took = time.monotonic() - started
            words = text_of(refused)
            assert refused.structured_content["exit_code"] != 0, words
            assert took < 5, f"a refused connection to {target} took {took:.1f} s"
            assert f"refused TCP to {target}" in words, words
            assert why in words, words

    run_with_config(state_dir, ALLOW_TEST_HOST, body)


def test_mode_none_has_no_network_and_a_request_wider_than_the_server_is_refused(state_dir, test_host):
    skip_without_kvm()

    async def body(session):
        made = await ok(session, "create_sandbox", {"network": {"mode": "none"}})
        sid = made["sandbox"]["sandbox_id"]
        assert made["sandbox"]["network"] == "none", made
        cut = await session.call_tool("run_command", {"sandbox_id": sid, "command": FETCH})
        assert cut.structured_content["exit_code"] != 0, text_of(cut)
        assert PAGE not in cut.structured_content["stdout"]

        wider = await session.call_tool("create_sandbox", {"network": {"mode": "public"}})
        assert wider.is_error
        assert "this server allows only allowlist" in text_of(wider), text_of(wider)

    run_with_config(state_dir, f'[network]\nmode = "allowlist"\nallow = ["{GUEST_SIDE}/32"]\n', body)


def test_the_network_works_after_pause_resume_and_in_every_fork(state_dir, test_host):
    skip_without_kvm()

    async def body(session):
        made = await ok(session, "create_sandbox", {})
        sid = made["sandbox"]["sandbox_id"]
        assert (await ok(session, "run_command", {"sandbox_id": sid, "command": FETCH}))["stdout"] == PAGE
        await ok(session, "pause", {"sandbox_id": sid})
        await ok(session, "resume", {"sandbox_id": sid})
        assert (await ok(session, "run_command", {"sandbox_id": sid, "command": FETCH}))["stdout"] == PAGE
        forks = await ok(session, "fork", {"sandbox_id": sid, "count": 2})
        for child in forks["sandboxes"]:
            got = await ok(session, "run_command", {"sandbox_id": child["sandbox_id"], "command": FETCH})
            assert got["stdout"] == PAGE, (child, got)
        assert (await ok(session, "run_command", {"sandbox_id": sid, "command": FETCH}))["stdout"] == PAGE

    run_with_config(state_dir, ALLOW_TEST_HOST, body)


def test_pip_install_from_the_default_index_just_works(state_dir):
    """The one test that reaches a real package registry, through the clients' own defaults."""
    skip_without_kvm()
    probe_dir = tempfile.mkdtemp(prefix="cappip-")
    try:
        probe = subprocess.run(
            ["python3", "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-q", "-d", probe_dir, "six"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "PIP_FIND_LINKS": "", "PIP_NO_INDEX": ""},
        )
    except subprocess.TimeoutExpired:
        pytest.skip("pip registry test: this host could not reach the package registry within 120 s")
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    if probe.returncode != 0:
        pytest.skip(f"pip registry test: this host itself cannot reach the package registry ({probe.stderr.strip()[-300:]})")

    async def body(session):
        installed = await session.call_tool(
            "run_command", {"command": "pip install --no-cache-dir six", "timeout_s": 300}
        )
        assert not installed.is_error, text_of(installed)
        assert "externally-managed" not in installed.structured_content["stderr"]
        used = await ok(session, "run_command", {"command": "python3 -c 'import six; print(six.__name__)'"})
        assert used["stdout"] == "six\n", used

    anyio.run(lambda: session_run(state_dir, body, engine="kvm"))
