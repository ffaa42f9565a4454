"""Bad input always gets an answer: a message over a transport's limit is refused at once,
naming the limit, over stdio and over HTTP (never a call that hangs)."""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from conftest import HttpServer, capsule_bin, server_env

ANSWER_WITHIN_S = 5
OVER_LIMIT = 17 * 1024 * 1024


def test_an_oversized_write_file_over_stdio_is_refused_at_once(state_dir):
    params = StdioServerParameters(command=capsule_bin(), args=["serve"], env=server_env(state_dir))

    async def main():
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                started = time.monotonic()
                with pytest.raises(Exception) as refused:
                    with anyio.fail_after(ANSWER_WITHIN_S):
                        await session.call_tool("write_file", {"path": "big.txt", "content": "x" * OVER_LIMIT})
                assert time.monotonic() - started < ANSWER_WITHIN_S
                assert "16 MiB" in str(refused.value), refused.value
                # The session goes on.
                r = await session.call_tool("run_command", {"command": "echo still"})
                assert r.structured_content["stdout"] == "still\n"

    anyio.run(main)


def test_an_oversized_raw_json_rpc_line_on_stdio_gets_an_error_with_its_id(state_dir):
    proc = subprocess.Popen([capsule_bin(), "serve"], env=server_env(state_dir), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        def send(message):
            proc.stdin.write(message if isinstance(message, bytes) else (json.dumps(message) + "\n").encode())
            proc.stdin.flush()

        send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}})
        assert json.loads(proc.stdout.readline())["id"] == 1
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        started = time.monotonic()
        body = b'{"jsonrpc":"2.0","id":"big-7","method":"tools/call","params":{"name":"write_file",' \
               b'"arguments":{"path":"x","content":"' + b"y" * OVER_LIMIT + b'"}}}\n'
        send(body)
        answer = json.loads(proc.stdout.readline())
        assert time.monotonic() - started < ANSWER_WITHIN_S
        assert answer["id"] == "big-7", answer
        assert answer["error"]["code"] == -32600 and "16 MiB" in answer["error"]["message"], answer
        send({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        assert json.loads(proc.stdout.readline())["id"] == 2, "the connection goes on"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_an_oversized_http_body_is_refused_at_once(state_dir):
    server = HttpServer(state_dir)
    try:
        body = b'{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"pad":"' + b"z" * OVER_LIMIT + b'"}}'
        request = urllib.request.Request(server.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Accept": "application/json, text/event-stream"})
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=ANSWER_WITHIN_S)
        assert time.monotonic() - started < ANSWER_WITHIN_S
        assert refused.value.code == 413
        assert str(16 * 1024 * 1024 - 1) in refused.value.read().decode(), "the limit is named"
    finally:
        server.stop()
