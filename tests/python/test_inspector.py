"""The official MCP inspector's CLI (`npx @modelcontextprotocol/inspector --cli`) as a second
real client, 2025-11-25 over stdio: it lists the tools and calls one, and its strict JSON Schema
validation of our output schemas prints no warnings (no non-standard `format` values). It is
fetched from the npm registry by `npx` on first use; the test skips, saying why, where `npx` is
missing or the package cannot be fetched."""

import json
import shutil
import subprocess

import pytest

from conftest import agent_bin, capsule_bin, shutdown_daemon

INSPECTOR = "@modelcontextprotocol/inspector"


def inspector(state_dir, *method_args):
    if shutil.which("npx") is None:
        pytest.skip("npx is not installed (Debian: apt-get install npm); the inspector CLI runs through it")
    cmd = ["npx", "-y", INSPECTOR, "--cli", "-e", f"CAPSULE_STATE_DIR={state_dir}", "-e", "CAPSULE_ENGINE=test",
           "-e", f"CAPSULE_AGENT_BIN={agent_bin()}", capsule_bin(), "serve", *method_args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip(f"`npx {INSPECTOR}` did not finish in 300 s (is the npm registry reachable?)")
    if done.returncode != 0 and ("ENOTFOUND" in done.stderr or "EAI_AGAIN" in done.stderr
                                 or "ECONNREFUSED" in done.stderr or "ETIMEDOUT" in done.stderr):
        pytest.skip(f"the npm registry is unreachable, so {INSPECTOR} cannot be fetched: {done.stderr.strip()[-300:]}")
    return done


def test_the_inspector_cli_lists_and_calls_tools_without_schema_warnings(state_dir):
    try:
        listed = inspector(state_dir, "--method", "tools/list")
        assert listed.returncode == 0, listed.stderr
        tools = json.loads(listed.stdout)["tools"]
        assert {"run_code", "run_command", "save_template", "list_templates"} <= {t["name"] for t in tools}
        assert "unknown format" not in listed.stderr, listed.stderr

        called = inspector(state_dir, "--method", "tools/call", "--tool-name", "run_command",
                           "--tool-arg", "command=echo inspected")
        assert called.returncode == 0, called.stderr
        result = json.loads(called.stdout)
        assert not result["isError"] and result["structuredContent"]["stdout"] == "inspected\n", result
        assert "unknown format" not in called.stderr and "warn" not in called.stderr.lower(), called.stderr
    finally:
        shutdown_daemon(state_dir)
