"""Fixtures for the external-client tests: a real `capsule serve` process (debug
build) driven by the official Python `mcp` SDK, on the test engine and, where
this host can run microVMs and a guest image is built, on the KVM engine.

Environment:
  CAPSULE_BIN        path to the capsule binary (default: <target>/debug/capsule)
  CAPSULE_AGENT_BIN  path to capsule-agent (default: next to capsule)
  CARGO_TARGET_DIR   where cargo built them (default: <repo>/target)
"""

import fcntl
import functools
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


# Engines the suite runs on: `test` (host processes) always, `kvm` (real microVMs) when the
# host can run them (see `kvm_unavailable`).
ENGINES = ("test", "kvm")
# Every state dir this session made; the leak check looks for workers of these only (other
# people's capsule servers on this host are not ours to judge).
_STATE_DIRS: list[str] = []


@functools.cache
def kvm_unavailable() -> str | None:
    """Why the KVM engine cannot run here (None when it can), from `capsule doctor --json`
    and `capsule image info --json`."""
    doctor = subprocess.run([capsule_bin(), "doctor", "--json"], capture_output=True, text=True, timeout=60)
    try:
        report = json.loads(doctor.stdout)
    except ValueError:
        return f"`capsule doctor --json` gave no report (exit {doctor.returncode}): {doctor.stderr.strip()}"
    if not report.get("can_run_vms"):
        why = report.get("kvm_error") or "; ".join(report.get("advice") or []) or "no reason given"
        return f"this host cannot run microVMs (`capsule doctor`: can_run_vms=false: {why})"
    info = subprocess.run([capsule_bin(), "image", "info", "--json"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RUST_BACKTRACE": "0"})
    if info.returncode != 0:
        why = info.stderr.strip().split("\n\n")[0]
        return f"no usable guest image (`capsule image info --json` exit {info.returncode}: {why})"
    return None


@pytest.fixture(params=ENGINES)
def engine(request):
    """The engine of a test that runs on both; the kvm variant skips, saying why, where the
    host cannot run it."""
    if request.param == "kvm":
        skip_without_kvm()
    return request.param


def skip_without_kvm():
    """Skips a kvm-engine test where the host cannot run it, saying why; with
    CAPSULE_REQUIRE_KVM=1 (CI where `capsule doctor` says VMs can run) that is a failure."""
    reason = kvm_unavailable()
    if reason:
        if os.environ.get("CAPSULE_REQUIRE_KVM") == "1":
            pytest.fail(f"CAPSULE_REQUIRE_KVM=1, but the kvm engine cannot run: {reason}")
        pytest.skip(f"kvm engine: {reason}")


def server_env(state_dir: str, engine: str = "test", **extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "CAPSULE_AGENT_BIN": agent_bin(),
            "CAPSULE_STATE_DIR": state_dir,
            "CAPSULE_ENGINE": engine,
            "CAPSULE_LOG": "capsule=info",
        }
    )
    env.update(extra)
    return env


def new_state_dir() -> tempfile.TemporaryDirectory:
    # Short path: agent and vsock sockets live under it and Unix socket paths are limited.
    d = tempfile.TemporaryDirectory(prefix="cps-", dir="/tmp")
    _STATE_DIRS.append(d.name)
    return d


@pytest.fixture
def state_dir():
    with new_state_dir() as d:
        yield d
        shutdown_daemon(d)
        kill_leftover_agents(d)


def daemon_pid(state_dir: str) -> int | None:
    """The pid of the capsule daemon that owns `state_dir` (from its lock file), if one runs."""
    try:
        pid = int(open(os.path.join(state_dir, "daemon.lock")).read().strip())
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):
        return None
    return None if state in ("Z", "X") else pid


def lock_is_free(state_dir: str) -> bool:
    """Whether no daemon holds the state directory's lock (released only once every thread of
    the daemon is gone: a group leader shows as a zombie while its other threads still exit)."""
    try:
        with open(os.path.join(state_dir, "daemon.lock")) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def kill9_daemon(state_dir: str) -> int:
    """SIGKILLs the daemon of `state_dir` (its workers and agents run on) and waits until it is
    gone for good (its lock released)."""
    pid = daemon_pid(state_dir)
    assert pid, f"no daemon runs for {state_dir}"
    os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline:
        if lock_is_free(state_dir) or daemon_pid(state_dir) not in (None, pid):
            return pid
        time.sleep(0.01)
    raise AssertionError(f"daemon {pid} did not die")


def shutdown_daemon(state_dir: str) -> None:
    """Stops the daemon of `state_dir` the way a user would (`capsule shutdown`), if one runs."""
    if daemon_pid(state_dir) is None:
        return
    subprocess.run([capsule_bin(), "shutdown", "--state-dir", state_dir], capture_output=True, timeout=120,
                   env={**os.environ, "CAPSULE_STATE_DIR": state_dir})


def _environ_of(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def leaked_workers() -> list[tuple[int, str]]:
    """`capsule worker` processes (VM workers) and `capsule daemon`s started for this session."""
    found = subprocess.run(["pgrep", "-af", "capsule (worker|daemon)"], capture_output=True, text=True).stdout
    ours = []
    for line in found.splitlines():
        pid_text, _, cmdline = line.partition(" ")
        pid = int(pid_text)
        if pid == os.getpid():
            continue
        env = _environ_of(pid)
        if any(f"CAPSULE_STATE_DIR={d}\0".encode() in env for d in _STATE_DIRS):
            ours.append((pid, cmdline))
    return ours


@pytest.fixture(scope="session", autouse=True)
def no_worker_outlives_the_session():
    """Fails the session if a VM worker of one of its servers is still running at the end
    (and kills those, by pid, so none outlives it)."""
    yield
    for d in _STATE_DIRS:
        if os.path.isdir(d):
            shutdown_daemon(d)
    deadline = time.time() + 10
    leaked = leaked_workers()
    while leaked and time.time() < deadline:
        time.sleep(0.2)
        leaked = leaked_workers()
    for pid, _ in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not leaked, f"VM workers or daemons outlived their state directories: {leaked}"


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
    def __init__(self, state_dir: str, *args: str, token: str | None = None, port: int | None = None,
                 engine: str = "test"):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        cmd = [capsule_bin(), "serve", "--transport", "http", "--listen", f"127.0.0.1:{self.port}", *args]
        env = server_env(state_dir, engine)
        if token:
            env["CAPSULE_TOKEN"] = token
        self.log = open(os.path.join(state_dir, f"server-{self.port}.log"), "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.flush()
                with open(self.log.name, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"capsule serve exited with {self.proc.returncode}:\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("capsule serve did not listen within 30 s")

    def wait_listening(self, timeout: float = 60):
        """Waits until the port accepts connections again (after a daemon restart)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nothing listens on {self.port} after {timeout} s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
