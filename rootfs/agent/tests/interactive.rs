//! Interactive background processes against the real agent binary: input
//! through `WriteProcess` on a pipe and on a pseudo-terminal, answers read
//! back with `ReadProcessOutput`, closing stdin, resizing the terminal, and
//! the errors for processes that cannot take input.

mod fixture;

use std::time::Duration;

use capsule_agent::client::{AgentClient, ClientError};
use capsule_agent::protocol::{ErrorKind, ExecRequest, Op, ProcessOutput, PtySize, Reply, MAX_PENDING_INPUT_BYTES};
use fixture::{eventually, start_foreground_sleep, TestAgent};

const T: Option<Duration> = Some(Duration::from_secs(30));
const WAIT: Duration = Duration::from_secs(20);

fn start(c: &AgentClient, script: &str, pty: Option<PtySize>) -> u32 {
    let req = ExecRequest { background: true, pty, ..ExecRequest::shell(script) };
    match c.call_reply(Op::Exec(req), T).unwrap() {
        Reply::Started { pid } => pid,
        other => panic!("unexpected {other:?}"),
    }
}

fn write(c: &AgentClient, pid: u32, data: &[u8], close_stdin: bool) -> Result<u64, ClientError> {
    match c.call_reply(Op::WriteProcess { pid, data: data.to_vec(), close_stdin }, T)? {
        Reply::InputQueued { pending_bytes } => Ok(pending_bytes),
        other => panic!("unexpected {other:?}"),
    }
}

fn output(c: &AgentClient, pid: u32) -> ProcessOutput {
    let op = Op::ReadProcessOutput { pid, stdout_offset: 0, stderr_offset: 0, max_bytes: 1 << 20 };
    match c.call_reply(op, T).unwrap() {
        Reply::ProcessOutput(o) => o,
        other => panic!("unexpected {other:?}"),
    }
}

fn stdout(c: &AgentClient, pid: u32) -> String {
    String::from_utf8_lossy(&output(c, pid).stdout).into_owned()
}

/// Waits until the process's stdout contains `text`.
fn wait_for(c: &AgentClient, pid: u32, text: &str) {
    assert!(eventually(WAIT, || stdout(c, pid).contains(text)), "no {text:?} in {:?}", stdout(c, pid));
}

fn kind_of(result: Result<impl std::fmt::Debug, ClientError>) -> ErrorKind {
    match result {
        Err(ClientError::Agent(e)) => e.kind,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

fn python_available() -> bool {
    std::process::Command::new("python3").arg("-c").arg("pass").status().is_ok_and(|s| s.success())
}

#[test]
fn a_shell_prompt_on_a_pipe_answers_what_is_written_and_ends_when_stdin_closes() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let pid = start(&c, "printf 'name? '; read name; echo \"hi $name\"; exec cat", None);
    wait_for(&c, pid, "name? ");
    assert_eq!(write(&c, pid, b"ada\n", false).unwrap(), 4, "queued, not yet read");
    wait_for(&c, pid, "name? hi ada\n");
    write(&c, pid, b"echoed by cat\n", false).unwrap();
    wait_for(&c, pid, "echoed by cat\n");
    assert_eq!(output(&c, pid).exit, None, "cat waits for more");
    write(&c, pid, b"last", true).unwrap();
    assert!(eventually(WAIT, || output(&c, pid).exit.is_some()), "closing stdin ends cat");
    let out = output(&c, pid);
    assert_eq!(out.exit.unwrap().code, Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("echoed by cat\nlast"));
    assert_eq!(kind_of(write(&c, pid, b"more", false)), ErrorKind::Closed);
}

#[test]
fn python_repl_on_a_pipe_evaluates_lines_written_to_it() {
    if !python_available() {
        eprintln!("SKIP: no python3");
        return;
    }
    let agent = TestAgent::start();
    let c = agent.connect();
    let pid = start(&c, "exec python3 -u -q -i", None);
    write(&c, pid, b"x = 6\nprint(x * 7)\n", false).unwrap();
    wait_for(&c, pid, "42\n");
    write(&c, pid, b"x + 1\n", false).unwrap();
    wait_for(&c, pid, "7\n");
    write(&c, pid, b"", true).unwrap();
    assert!(eventually(WAIT, || output(&c, pid).exit.is_some()), "end of file ends the REPL");
    assert_eq!(output(&c, pid).exit.unwrap().code, Some(0));
}

#[test]
fn a_process_on_a_pty_sees_a_terminal_of_the_requested_size() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let size = PtySize { rows: 33, cols: 101 };
    let pid = start(&c, "tty; stty size; [ -t 0 ] && echo stdin-is-a-tty; read line; echo \"got $line\"", Some(size));
    wait_for(&c, pid, "33 101");
    let text = stdout(&c, pid);
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(text.contains("stdin-is-a-tty"), "{text:?}");
    write(&c, pid, b"typed\n", false).unwrap();
    wait_for(&c, pid, "got typed");
    assert!(eventually(WAIT, || output(&c, pid).exit.is_some()));
    let out = output(&c, pid);
    assert!(out.stderr.is_empty(), "a terminal is one stream: {:?}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("typed\r\n"), "the terminal echoes input");
}

#[test]
fn closing_stdin_on_a_pty_sends_end_of_file() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let pid = start(&c, "cat; echo cat-ended", Some(PtySize { rows: 24, cols: 80 }));
    write(&c, pid, b"line\n", false).unwrap();
    wait_for(&c, pid, "line\r\nline\r\n");
    write(&c, pid, b"", true).unwrap();
    wait_for(&c, pid, "cat-ended");
    assert_eq!(kind_of(write(&c, pid, b"x", false)), ErrorKind::Closed);
}

#[test]
fn python_repl_on_a_pty_prompts_and_answers() {
    if !python_available() {
        eprintln!("SKIP: no python3");
        return;
    }
    let agent = TestAgent::start();
    let c = agent.connect();
    let pid = start(&c, "exec python3 -q -i", Some(PtySize { rows: 24, cols: 80 }));
    wait_for(&c, pid, ">>> ");
    write(&c, pid, b"6 * 7\n", false).unwrap();
    wait_for(&c, pid, "42\r\n");
    write(&c, pid, b"", true).unwrap();
    assert!(eventually(WAIT, || output(&c, pid).exit.is_some()), "Ctrl-D ends the REPL");
}

#[test]
fn resizing_a_pty_changes_its_size_and_signals_the_process() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let script = "trap 'echo winch; stty size' WINCH; echo ready; while :; do sleep 0.1; done";
    let pid = start(&c, &format!("exec bash -c \"{script}\""), Some(PtySize { rows: 24, cols: 80 }));
    wait_for(&c, pid, "ready");
    c.call_reply(Op::ResizePty { pid, size: PtySize { rows: 40, cols: 120 } }, T).unwrap();
    wait_for(&c, pid, "winch");
    wait_for(&c, pid, "40 120");
    let bad = c.call_reply(Op::ResizePty { pid, size: PtySize { rows: 0, cols: 120 } }, T);
    assert_eq!(kind_of(bad), ErrorKind::InvalidArgument);
    c.call_reply(Op::Signal { pid, signal: 9 }, T).unwrap();
}

#[test]
fn processes_that_cannot_take_input_say_why() {
    let agent = TestAgent::start();
    let c = agent.connect();
    assert_eq!(kind_of(write(&c, u32::MAX, b"x", false)), ErrorKind::NotFound);
    let (handle, _rx, fg) = start_foreground_sleep(&agent, &c, "fg.pid");
    assert_eq!(kind_of(write(&c, fg, b"x", false)), ErrorKind::InvalidArgument, "a foreground process");
    handle.cancel().unwrap();
    let done = start(&c, "true", None);
    assert!(eventually(WAIT, || output(&c, done).exit.is_some()));
    assert_eq!(kind_of(write(&c, done, b"x", false)), ErrorKind::Closed, "it exited");
    let idle = start(&c, "exec sleep 300", None);
    let too_big = vec![0u8; MAX_PENDING_INPUT_BYTES + 1];
    assert_eq!(kind_of(write(&c, idle, &too_big, false)), ErrorKind::TooLarge);
    // A process that does not read: its queue fills to the cap, then refuses.
    let half = vec![b'y'; MAX_PENDING_INPUT_BYTES / 2 + 1];
    write(&c, idle, &half, false).unwrap();
    assert!(eventually(WAIT, || write(&c, idle, &half, false).is_err()), "the queue never filled");
    assert_eq!(kind_of(write(&c, idle, &half, false)), ErrorKind::TooLarge);
    let resize = c.call_reply(Op::ResizePty { pid: idle, size: PtySize { rows: 10, cols: 10 } }, T);
    assert_eq!(kind_of(resize), ErrorKind::InvalidArgument, "no terminal");
    let mut foreground_pty = ExecRequest::shell("true");
    foreground_pty.pty = Some(PtySize { rows: 24, cols: 80 });
    assert_eq!(kind_of(c.exec(foreground_pty, T)), ErrorKind::InvalidArgument);
    c.call_reply(Op::Signal { pid: idle, signal: 9 }, T).unwrap();
}

#[test]
fn input_and_output_outlive_the_connection_that_started_the_process() {
    let agent = TestAgent::start();
    let first = agent.connect();
    let pid = start(&first, "exec cat", None);
    write(&first, pid, b"one\n", false).unwrap();
    drop(first);
    let second = agent.connect();
    wait_for(&second, pid, "one\n");
    write(&second, pid, b"two\n", true).unwrap();
    wait_for(&second, pid, "one\ntwo\n");
    assert!(eventually(WAIT, || output(&second, pid).exit.is_some()));
}

#[test]
fn background_stdin_given_at_start_is_written_first_and_stays_open() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let mut req = ExecRequest { background: true, ..ExecRequest::shell("exec cat") };
    req.stdin = Some(b"first\n".to_vec());
    let pid = match c.call_reply(Op::Exec(req), T).unwrap() {
        Reply::Started { pid } => pid,
        other => panic!("unexpected {other:?}"),
    };
    wait_for(&c, pid, "first\n");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(output(&c, pid).exit, None, "stdin stays open for more");
    write(&c, pid, b"second\n", true).unwrap();
    wait_for(&c, pid, "first\nsecond\n");
    assert!(eventually(WAIT, || output(&c, pid).exit.is_some()));
}
