// capsule's JavaScript driver: one long-lived node process behind a `run_code` context.
//
// Wire (owned by rootfs/agent/src/context/driver.rs), the same as the Python driver's:
// - fd 3 (read): one JSON object per line, {"code": str, "count": int}.
// - fd 4 (write): one JSON object per line: {"t":"ready"}, {"t":"result",...},
//   {"t":"error",...}, {"t":"done"}.
// - fd 1/2 are the real stdout/stderr; on Linux node writes to pipes synchronously,
//   so console.log output is in the pipe before "done" is sent.
//
// Cells are evaluated by node's own REPL evaluator (the `repl` module's eval),
// for cells with `await` (it rewrites top-level await, keeping top-level
// declarations global), and as plain `vm` scripts otherwise; either way
// top-level `let`/`const`/`function`/`class` persist across cells, and SIGINT
// interrupts a running cell without killing the process.
'use strict';

const fs = require('fs');
const repl = require('repl');
const util = require('util');
const vm = require('vm');
const domain = require('domain');
const readline = require('readline');
const { PassThrough, Writable } = require('stream');

const CMD_FD = 3;
const MSG_FD = 4;

function send(obj) {
  const data = Buffer.from(JSON.stringify(obj) + '\n');
  let off = 0;
  while (off < data.length) {
    try {
      off += fs.writeSync(MSG_FD, data, off);
    } catch (e) {
      if (e.code !== 'EAGAIN') throw e;
    }
  }
}

// The frames of node's REPL machinery and of this driver mean nothing to the user.
function cleanStack(stack) {
  return String(stack)
    .split('\n')
    .filter((line) => !/^\s+at .*(\(node:|\(?node:|node_driver\.js)/.test(line))
    .filter((line) => !/^\s+at (process|REPLServer|Domain|Script|defaultEval)\b/.test(line))
    .filter((line) => !/^\s+at new Promise \(<anonymous>\)$/.test(line));
}

function sendError(err) {
  if (err !== null && typeof err === 'object') {
    let stack;
    try {
      stack = err.stack;
    } catch (_) {
      stack = undefined;
    }
    send({
      t: 'error',
      name: String(err.name || 'Error'),
      value: String(err.message === undefined ? '' : err.message),
      traceback: cleanStack(stack || `${err.name}: ${err.message}`),
    });
  } else {
    send({ t: 'error', name: 'Error', value: `Uncaught ${util.inspect(err)}`, traceback: [] });
  }
}

// Errors thrown by the cell (synchronously, after an `await`, or from a
// callback it scheduled) reach the REPL's domain; ours is registered first.
let finishCell = null;
const replDomain = domain.create();
replDomain.on('error', (err) => {
  if (finishCell !== null) {
    finishCell(err, undefined);
  } else {
    process.stderr.write(`Uncaught ${util.inspect(err)}\n`);
  }
});

const server = repl.start({
  input: new PassThrough(),
  output: new Writable({ write(_chunk, _enc, cb) { cb(); } }),
  terminal: false,
  useGlobal: true,
  // The REPL's own SIGINT watchdog resets the process's SIGINT handler: ours does the job.
  breakEvalOnSigint: false,
  ignoreUndefined: true,
  prompt: '',
  domain: replDomain,
});

process.on('SIGINT', () => {
  // Reached only while the event loop runs: the cell is awaiting. It is given
  // up (what it awaits may still settle later, unobserved). A synchronous cell
  // is stopped by `breakOnSigint` instead.
  if (finishCell !== null) {
    const err = new Error('Script execution was interrupted by `SIGINT` while awaiting');
    err.stack = `${err.name}: ${err.message}`;
    finishCell(err, undefined);
  }
});
process.on('uncaughtException', (err) => {
  if (finishCell !== null) finishCell(err, undefined);
  else process.stderr.write(`Uncaught ${util.inspect(err)}\n`);
});
process.on('unhandledRejection', (reason) => {
  process.stderr.write(`Unhandled promise rejection: ${util.inspect(reason)}\n`);
});

// Cells without `await` run as plain scripts in the global context: their
// top-level declarations persist like the REPL's, and `breakOnSigint` makes
// SIGINT interrupt even a busy loop.
function runScript(code, file) {
  let script;
  const trimmed = code.trim();
  if (trimmed.startsWith('{') && !trimmed.endsWith(';')) {
    // `{ a: 1 }` is an object to a REPL user, not a block.
    try {
      script = new vm.Script(`(${trimmed})\n`, { filename: file });
    } catch (_) {
      script = undefined;
    }
  }
  if (script === undefined) script = new vm.Script(code, { filename: file });
  return script.runInThisContext({ breakOnSigint: true, displayErrors: false });
}

function runCell(code, count) {
  return new Promise((resolve) => {
    let settled = false;
    finishCell = (err, value) => {
      if (settled) return;
      settled = true;
      finishCell = null;
      resolve([err, value]);
    };
    const cb = (err, value) => {
      if (finishCell !== null) finishCell(err, value);
    };
    const file = `cell-${count}`;
    try {
      if (code.includes('await')) {
        // The REPL's evaluator rewrites top-level await into an async function
        // while keeping top-level declarations global.
        server.eval(code, server.context, file, cb);
      } else {
        cb(null, runScript(code, file));
      }
    } catch (err) {
      cb(err, undefined);
    }
  });
}

const queue = [];
let busy = false;

async function pump() {
  if (busy) return;
  busy = true;
  while (queue.length > 0) {
    const msg = queue.shift();
    const [err, value] = await runCell(msg.code, msg.count);
    if (err !== null && err !== undefined) {
      sendError(err);
    } else if (value !== undefined) {
      server.context._ = value;
      send({ t: 'result', main: true, data: { 'text/plain': util.inspect(value) } });
    }
    send({ t: 'done' });
  }
  busy = false;
}

const commands = readline.createInterface({ input: fs.createReadStream(null, { fd: CMD_FD }) });
commands.on('line', (line) => {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (err) {
    sendError(err);
    send({ t: 'done' });
    return;
  }
  queue.push(msg);
  pump();
});
commands.on('close', () => process.exit(0));

send({ t: 'ready' });
