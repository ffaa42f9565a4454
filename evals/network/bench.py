"""Network benchmark (an eval, not a test: it prints numbers and ratios, and fails only when
something does not work). Through `capsule serve` over stdio and the Python MCP SDK, on the KVM
engine, against an HTTP server in a network namespace it makes itself (as tests/python/
test_network.py does), in one run:

1. download throughput of a SIZE MiB file (default 256) from the test host, in the sandbox
   (`curl -o /dev/null`) against the host's own download of it, interleaved, best of 3 each;
2. TCP connect latency from the guest to the test host (a Python loop of N connects inside
   the sandbox, timed in the guest) against host-to-host connects, p50 and p99;
3. extra host memory per sandbox with networking on: the worker's RSS (the guest's memory
   mapped by the worker excluded: anonymous private memory outside guest RAM) while the
   download runs, against the same worker idle before any connection.

Run: `python3 evals/network/bench.py [--size-mib 256] [--connects 200]` (root, iproute2, a
built image; uses the debug build of `capsule` unless CAPSULE_BIN says otherwise).
"""

import argparse
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import anyio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

REPO = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
CAPSULE = os.environ.get("CAPSULE_BIN") or str(TARGET / "debug" / "capsule")
HOST_SIDE, TEST_HOST, PORT = "198.18.9.1", "198.18.9.2", 8090


def ip(*args, check=True):
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


class TestHost:
    def __init__(self, size_mib):
        self.ns, self.veth = f"capb{os.getpid() % 100000}", f"cvb{os.getpid() % 100000}"
        ip("netns", "add", self.ns)
        ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        ip("addr", "add", f"{HOST_SIDE}/24", "dev", self.veth)
        ip("link", "set", self.veth, "up")
        ip("-n", self.ns, "addr", "add", f"{TEST_HOST}/24", "dev", "eth0")
        ip("-n", self.ns, "link", "set", "eth0", "up")
        ip("-n", self.ns, "link", "set", "lo", "up")
        self.root = tempfile.mkdtemp(prefix="capnetb-")
        with open(os.path.join(self.root, "big.bin"), "wb") as f:
            f.truncate(size_mib << 20)
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "python3", "-m", "http.server", str(PORT), "--bind", TEST_HOST],
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection((TEST_HOST, PORT), 1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the test host's HTTP server did not come up")

    def close(self):
        self.server.kill()
        self.server.wait()
        ip("link", "del", self.veth, check=False)
        ip("netns", "del", self.ns, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def host_download_s(url):
    started = time.monotonic()
    subprocess.run(["curl", "-sS", "-o", "/dev/null", url], check=True)
    return time.monotonic() - started


def host_connects_ms(n):
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        socket.create_connection((TEST_HOST, PORT), 5).close()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


GUEST_CONNECTS = """
import socket, time, json
samples = []
for _ in range({n}):
    t = time.perf_counter()
    socket.create_connection(("{host}", {port}), 5).close()
    samples.append((time.perf_counter() - t) * 1000)
print(json.dumps(samples))
"""


def pctl(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def worker_private_kib(state_dir):
    """Anonymous private memory of the sandbox's VM worker outside its guest RAM mapping (the
    largest mapping), in KiB."""
    found = subprocess.run(["pgrep", "-f", "capsule worker"], capture_output=True, text=True).stdout.split()
    for pid in found:
        try:
            env = open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
        if f"CAPSULE_STATE_DIR={state_dir}".encode() not in env and state_dir.encode() not in open(f"/proc/{pid}/cmdline", "rb").read():
            continue
        maps, current, sizes = open(f"/proc/{pid}/smaps").read().splitlines(), None, []
        for line in maps:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5:
                current = {"size": 0, "anon": 0}
                sizes.append(current)
            elif parts[0] == "Size:" and current is not None:
                current["size"] = int(parts[1])
            elif parts[0] == "Anonymous:" and current is not None:
                current["anon"] = int(parts[1])
        sizes.sort(key=lambda m: m["size"])
        return sum(m["anon"] for m in sizes[:-1])
    return None


async def bench(args, state_dir):
    env = {**os.environ, "CAPSULE_STATE_DIR": state_dir, "CAPSULE_ENGINE": "kvm",
           "CAPSULE_CONFIG": os.path.join(state_dir, "capsule.toml")}
    url = f"http://{TEST_HOST}:{PORT}/big.bin"
    async with stdio_client(StdioServerParameters(command=CAPSULE, args=["serve"], env=env)) as (r, w):
        async with ClientSession(r, w, read_timeout_seconds=600) as session:
            await session.initialize()

            async def sh(command):
                res = await session.call_tool("run_command", {"command": command, "timeout_s": 600})
                if res.is_error:
                    raise SystemExit(f"{command!r} failed: {res.content}")
                return res.structured_content

            await sh("true")
            idle_kib = worker_private_kib(state_dir)
            guest_s, host_s, during = [], [], []
            for _ in range(3):
                host_s.append(host_download_s(url))
                started = time.monotonic()
                download = session.call_tool("run_command", {"command": f"curl -sS -o /dev/null -w '%{{time_total}}' {url}", "timeout_s": 600})
                async with anyio.create_task_group() as tg:
                    result = {}

                    async def run():
                        result["r"] = await download
                    tg.start_soon(run)
                    await anyio.sleep(1.0)
                    during.append(worker_private_kib(state_dir))
                if result["r"].is_error:
                    raise SystemExit(f"the guest download failed: {result['r'].content}")
                guest_s.append(float(result["r"].structured_content["stdout"]))
            size = args.size_mib
            g, h = size / min(guest_s), size / min(host_s)
            print(f"1. download of {size} MiB, best of 3")
            print(f"   host            {h:8.1f} MiB/s")
            print(f"   sandbox (curl)  {g:8.1f} MiB/s   ratio sandbox/host {g / h:.2f}x (target >= 0.3x)")

            out = await sh(f"python3 -c '{GUEST_CONNECTS.format(n=args.connects, host=TEST_HOST, port=PORT)}'")
            guest_ms = json.loads(out["stdout"])
            host_ms = host_connects_ms(args.connects)
            print(f"2. TCP connect, N = {args.connects}")
            print(f"   host -> test host     p50 {pctl(host_ms, .5):7.3f} ms   p99 {pctl(host_ms, .99):7.3f} ms")
            print(f"   guest -> test host    p50 {pctl(guest_ms, .5):7.3f} ms   p99 {pctl(guest_ms, .99):7.3f} ms"
                  f"   ratio p50 {pctl(guest_ms, .5) / pctl(host_ms, .5):.1f}x (target p50 < 2 ms)")

            peak = max(d for d in during if d is not None) if any(during) else None
            print("3. worker memory outside guest RAM (anonymous, KiB)")
            print(f"   idle {idle_kib}   during a download {peak}   extra {None if peak is None or idle_kib is None else peak - idle_kib} KiB"
                  " (target < 4096)")
            for s in (await session.call_tool("list_sandboxes", {})).structured_content["sandboxes"]:
                await session.call_tool("kill_sandbox", {"sandbox_id": s["sandbox_id"]})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--connects", type=int, default=200)
    args = parser.parse_args()
    host = TestHost(args.size_mib)
    state_dir = tempfile.mkdtemp(prefix="cpnb-", dir="/tmp")
    os.chmod(state_dir, 0o700)
    pathlib.Path(state_dir, "capsule.toml").write_text(f'[network]\nmode = "public"\nallow = ["{TEST_HOST}/32"]\n')
    try:
        anyio.run(bench, args, state_dir)
    finally:
        subprocess.run([CAPSULE, "shutdown", "--state-dir", state_dir], capture_output=True, timeout=120)
        host.close()
        shutil.rmtree(state_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
