"""Fixtures for the external-client tests: a real `capsule serve --engine test`
process (debug build) driven by the official Python `mcp` SDK.

Environment:
  CAPSULE_BIN        path to the capsule binary (default: <target>/debug/capsule)
  CAPSULE_AGENT_BIN  path to capsule-agent (default: next to capsule)
  CARGO_TARGET_DIR   where cargo built them (default: <repo>/target)
"""

import json
import os
import pathlib
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _target_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))


def capsule_bin() -> str:
    path = os.environ.get("CAPSULE_BIN") or str(_target_dir() / "debug" / "capsule")
    if not os.path.isfile(path):
        pytest.fail(f"no capsule binary at {path}: run `cargo build -p capsule -p capsule-agent` first")
    return path


def agent_bin() -> str:
    path = os.environ.get("CAPSULE_AGENT_BIN") or str(pathlib.Path(capsule_bin()).parent / "capsule-agent")
    if not os.path.isfile(path):
        pytest.fail(f"no capsule-agent binary at {path}: run `cargo build -p capsule-agent` first")
    return path


def server_env(state_dir: str, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "CAPSULE_AGENT_BIN": agent_bin(),
            "CAPSULE_STATE_DIR": state_dir,
            "CAPSULE_ENGINE": "test",
            "CAPSULE_LOG": "capsule=info",
        }
    )
    env.update(extra)
    return env


@pytest.fixture
def state_dir():
    # Short path: agent sockets live under it and Unix socket paths are limited.
    with tempfile.TemporaryDirectory(prefix="cps-", dir="/tmp") as d:
        yield d
        kill_leftover_agents(d)


def kill_leftover_agents(state_dir: str) -> None:
    """SIGKILLs any agent a test left behind (registry pids), so none outlives the test."""
    db = pathlib.Path(state_dir) / "registry.sqlite3"
    if not db.exists():
        return
    try:
        rows = sqlite3.connect(str(db)).execute("SELECT engine_state FROM sandboxes").fetchall()
    except sqlite3.Error:
        return
    for (state,) in rows:
        try:
            pid = json.loads(state).get("pid")
        except (ValueError, AttributeError):
            continue
        if isinstance(pid, int) and pid > 1:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HttpServer:
    def __init__(self, state_dir: str, *args: str, token: str | None = None, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        cmd = [capsule_bin(), "serve", "--transport", "http", "--listen", f"127.0.0.1:{self.port}", *args]
        env = server_env(state_dir)
        if token:
            env["CAPSULE_TOKEN"] = token
        self.log = open(os.path.join(state_dir, f"server-{self.port}.log"), "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"capsule serve exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("capsule serve did not listen within 30 s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
