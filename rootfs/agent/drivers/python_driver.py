# capsule's Python driver: one long-lived interpreter behind a `run_code` context.
#
# Wire (owned by rootfs/agent/src/context/driver.rs):
# - fd 3 (read): one JSON object per line, {"code": str, "count": int}.
# - fd 4 (write): one JSON object per line:
#     {"t": "ready"}                                   once, after start-up
#     {"t": "result", "main": bool, "data": {mime: str}, "ack": bool}
#                                     text as str, image/png as base64; with
#                                     "ack", the driver waits for an empty line on fd 3
#     {"t": "error", "name": str, "value": str, "traceback": [str]}
#     {"t": "done"}                                    the cell ended
# - fd 1/2 stay the real stdout/stderr (pipes the agent streams), so output of
#   subprocesses and os.write(1, ...) is captured too.
#
# This file must stay cheap to start: it imports nothing heavy, and matplotlib
# only matters once the user's code has imported it.

import ast
import json
import linecache
import os
import signal
import sys
import types

_CMD_FD = 3
_MSG_FD = 4
_DRIVER_FILE = __file__ if "__file__" in globals() else "<capsule-driver>"
_CO_COROUTINE = 0x0080
_PYPLOT = "matplotlib.pyplot"

_in_user_code = False


_commands = None


def _send(obj):
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(_MSG_FD, data):]


def _send_and_wait(obj):
    """Sends a message mid-cell and waits for the agent's ack (an empty line on
    fd 3): the agent has then emitted all output written before it, so output
    written after it cannot overtake it."""
    obj["ack"] = True
    _send(obj)
    while True:
        try:
            _commands.readline()
            return
        except KeyboardInterrupt:
            continue


def _on_sigint(_signum, _frame):
    # The agent interrupts a cell with SIGINT. Outside the user's code (idle,
    # or sending results) a late SIGINT is dropped rather than killing us.
    if _in_user_code:
        raise KeyboardInterrupt


def _flush_std():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _b64(data):
    import base64

    return base64.b64encode(data).decode("ascii")


def _figure_results():
    """Sends every open matplotlib figure as a PNG result, then closes it."""
    plt = sys.modules.get(_PYPLOT)
    if plt is None:
        return
    import io

    try:
        nums = plt.get_fignums()
    except Exception:
        return
    for num in nums:
        try:
            fig = plt.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight")
            _flush_std()
            _send_and_wait({
                "t": "result",
                "main": False,
                "data": {"image/png": _b64(buf.getvalue()), "text/plain": repr(fig)},
            })
        except Exception as exc:  # a broken figure must not break the cell
            print(f"capsule: could not render figure {num}: {exc!r}", file=sys.stderr)
        finally:
            try:
                plt.close(num)
            except Exception:
                pass


def _show(*_args, **_kwargs):
    """Replaces pyplot.show: captures the open figures now, as Jupyter's inline backend does."""
    _figure_results()


class _PyplotHook:
    """Patches pyplot.show the moment the user's code imports matplotlib.pyplot."""

    def find_spec(self, name, path=None, target=None):
        if name != _PYPLOT:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            module.show = _show

        spec.loader.exec_module = exec_module
        return spec

    def invalidate_caches(self):
        pass


def _mime_bundle(value):
    data = {}
    try:
        data["text/plain"] = repr(value)
    except Exception as exc:
        data["text/plain"] = f"<repr failed: {exc!r}>"
    # Only call rich reprs defined on the type (not via __getattr__ magic).
    kind = type(value)
    if isinstance(value, type):
        return data
    html = getattr(kind, "_repr_html_", None)
    if callable(html):
        try:
            out = html(value)
            if isinstance(out, str):
                data["text/html"] = out
        except Exception:
            pass
    png = getattr(kind, "_repr_png_", None)
    if callable(png):
        try:
            out = png(value)
            if isinstance(out, (bytes, bytearray)):
                data["image/png"] = _b64(bytes(out))
        except Exception:
            pass
    return data


def _display(*objs, **_kwargs):
    """IPython's display(): sends each object's MIME bundle now, as a non-main result."""
    for obj in objs:
        _flush_std()
        _send_and_wait({"t": "result", "main": False, "data": _mime_bundle(obj)})


def _error(exc):
    import traceback

    # Drop the driver's own frames (its exec at the top, its SIGINT handler at
    # the bottom): the user sees only their code.
    report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    report.stack = traceback.StackSummary.from_list(
        [frame for frame in report.stack if frame.filename != _DRIVER_FILE]
    )
    try:
        lines = "".join(report.format()).splitlines()
        value = str(exc)
    except Exception:  # an exception whose __str__ raises
        lines = []
        value = "<exception str() failed>"
    _send({
        "t": "error",
        "name": type(exc).__name__,
        "value": value,
        "traceback": lines,
    })


_loop = None


def _run_awaitable(coro):
    global _loop
    import asyncio

    if _loop is None:
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(coro)


def _run_cell(code, count, ns):
    global _in_user_code
    filename = f"<cell-{count}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    try:
        tree = compile(code, filename, "exec", ast.PyCF_ONLY_AST | flags)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        body = compile(tree, filename, "exec", flags)
        tail = compile(last, filename, "eval", flags) if last is not None else None
    except (SyntaxError, ValueError, OverflowError) as exc:
        _error(exc)
        return
    value = None
    try:
        _in_user_code = True
        out = eval(body, ns)
        if body.co_flags & _CO_COROUTINE:
            _run_awaitable(out)
        if tail is not None:
            value = eval(tail, ns)
            if tail.co_flags & _CO_COROUTINE:
                value = _run_awaitable(value)
        _in_user_code = False
    except BaseException as exc:  # KeyboardInterrupt and SystemExit included
        _in_user_code = False
        _flush_std()
        _error(exc)
        value = None
    _flush_std()
    _figure_results()
    if value is not None:
        ns["_"] = value
        _send({"t": "result", "main": True, "data": _mime_bundle(value)})


def main():
    global _in_user_code, _commands
    # The user's processes (os.system, fork+exec) must not inherit the driver's pipes.
    os.set_inheritable(_CMD_FD, False)
    os.set_inheritable(_MSG_FD, False)
    signal.signal(signal.SIGINT, _on_sigint)
    sys.meta_path.insert(0, _PyplotHook())
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = __builtins__
    # Code written for Jupyter calls display() without importing it.
    import builtins

    builtins.display = _display
    sys.modules["__main__"] = module
    ns = module.__dict__
    _commands = os.fdopen(_CMD_FD, "rb")
    _send({"t": "ready"})
    while True:
        try:
            line = _commands.readline()
        except KeyboardInterrupt:
            continue
        if not line:
            return
        try:
            msg = json.loads(line)
            _run_cell(msg["code"], msg["count"], ns)
        except KeyboardInterrupt:
            _in_user_code = False
            _error(KeyboardInterrupt())
        except Exception as exc:  # a driver fault: report it, keep the context
            _in_user_code = False
            _error(exc)
        _send({"t": "done"})


main()
