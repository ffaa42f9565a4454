//! `Op::Exec` against the real agent binary: exit codes, signals, timeouts,
//! stdin/env/cwd, output caps, binary output, background processes.

mod fixture;

use std::time::{Duration, Instant};

use capsule_agent::client::ClientError;
use capsule_agent::protocol::{ErrorKind, ExecRequest, Op, ProcessInfo, ProcessOutput, Reply, Stream};
use fixture::{eventually, process_alive, read_pid_file, TestAgent};

const T: Option<Duration> = Some(Duration::from_secs(30));

#[test]
fn exit_codes_and_killing_signals_are_reported() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let out = c.exec(ExecRequest::shell("exit 3"), T).unwrap();
    assert_eq!((out.status.code, out.status.signal, out.status.timed_out), (Some(3), None, false));
    let out = c.exec(ExecRequest::shell("kill -9 $$"), T).unwrap();
    assert_eq!((out.status.code, out.status.signal), (None, Some(9)));
    let out = c.exec(ExecRequest::argv(&["true"]), T).unwrap();
    assert_eq!(out.status.code, Some(0));
    let err = c.exec(ExecRequest::argv(&["/no/such/program"]), T).unwrap_err();
    assert!(matches!(err, ClientError::Agent(ref e) if e.kind == ErrorKind::NotFound), "{err:?}");
    let err = c.exec(ExecRequest::argv(&[]), T).unwrap_err();
    assert!(matches!(err, ClientError::Agent(ref e) if e.kind == ErrorKind::InvalidArgument), "{err:?}");
}

#[test]
fn stdin_env_and_cwd_reach_the_command() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let mut req = ExecRequest::shell("cat; printf ':%s:' \"$GREETING\"; pwd >&2");
    req.stdin = Some(b"from stdin\0\xff".to_vec());
    req.env = vec![("GREETING".into(), "hello there".into())];
    std::fs::create_dir(agent.work.join("sub")).unwrap();
    req.cwd = Some("sub".into());
    let out = c.exec(req, T).unwrap();
    assert_eq!(out.stdout, b"from stdin\0\xff:hello there:");
    let expected_cwd = format!("{}\n", agent.work.join("sub").display());
    assert_eq!(String::from_utf8_lossy(&out.stderr), expected_cwd);
    assert_eq!(out.status.stdout_bytes, out.stdout.len() as u64);
    assert_eq!(out.status.stderr_bytes, out.stderr.len() as u64);

    // More stdin than a pipe holds, so it is written in pieces.
    let mut big = ExecRequest::argv(&["wc", "-c"]);
    big.stdin = Some(vec![b'z'; 3 * 1024 * 1024 + 1]);
    assert_eq!(c.exec(big, T).unwrap().stdout, b"3145729\n");

    let mut missing = ExecRequest::shell("true");
    missing.cwd = Some("no-such-dir".into());
    let err = c.exec(missing, T).unwrap_err();
    assert!(matches!(err, ClientError::Agent(ref e) if e.kind == ErrorKind::NotFound), "{err:?}");
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let pid_file = agent.work.join("child.pid");
    let script = format!("sleep 300 & echo $! > {}; sleep 300", pid_file.display());
    let start = Instant::now();
    let out = c.exec(ExecRequest::shell(&script), Some(Duration::from_millis(500))).unwrap();
    assert!(out.status.timed_out, "{:?}", out.status);
    assert_eq!(out.status.signal, Some(9));
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    let child = read_pid_file(&pid_file);
    assert!(
        eventually(Duration::from_secs(5), || !process_alive(child)),
        "the backgrounded grandchild {child} survived the timeout"
    );
}

#[test]
fn fifty_megabytes_of_output_are_capped_and_kept_whole_in_a_file() {
    const TOTAL: usize = 50 * 1024 * 1024;
    let agent = TestAgent::start();
    let c = agent.connect();
    let out = c.exec(ExecRequest::shell(&format!("yes 0123456789abcdef | head -c {TOTAL}; echo done >&2")), T).unwrap();
    let cap = capsule_agent::protocol::DEFAULT_OUTPUT_CAP_BYTES as usize;
    assert_eq!(out.status.code, Some(0));
    assert_eq!(out.status.stdout_bytes, TOTAL as u64);
    assert_eq!(out.stdout.len(), cap, "exactly the cap is streamed");
    assert_eq!(out.stderr, b"done\n");
    assert_eq!(out.truncated.len(), 1);
    let (stream, path) = &out.truncated[0];
    assert_eq!(*stream, Stream::Stdout);
    assert!(path.starts_with(&agent.state.display().to_string()), "{path}");
    let kept = std::fs::read(path).unwrap();
    assert_eq!(kept.len(), TOTAL, "the file holds the whole stream");
    assert_eq!(&kept[..cap], &out.stdout[..]);
    let pattern = b"0123456789abcdef\n";
    assert!(kept.chunks(pattern.len()).all(|ch| ch == &pattern[..ch.len()]), "file content is exact");
}

#[test]
fn a_foreground_overflow_file_stops_at_its_cap_with_a_marker() {
    use capsule_agent::output::{truncation_marker, MAX_OUTPUT_FILE_BYTES};
    let total = MAX_OUTPUT_FILE_BYTES + 8 * 1024 * 1024;
    let agent = TestAgent::start();
    let c = agent.connect();
    let mut req = ExecRequest::shell(&format!("yes | head -c {total}"));
    req.output_cap_bytes = Some(16);
    let out = c.exec(req, T).unwrap();
    assert_eq!(out.status.stdout_bytes, total, "every byte is counted");
    assert_eq!(out.stdout, b"y\ny\ny\ny\ny\ny\ny\ny\n");
    let (_, path) = &out.truncated[0];
    let kept = std::fs::read(path).unwrap();
    let marker = truncation_marker(MAX_OUTPUT_FILE_BYTES);
    assert_eq!(kept.len() as u64, MAX_OUTPUT_FILE_BYTES + marker.len() as u64);
    assert!(kept.ends_with(marker.as_bytes()));
    assert!(kept[..16].starts_with(b"y\ny\n"));
}

#[test]
fn a_small_cap_applies_per_request() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let mut req = ExecRequest::shell("printf abcdefghij; printf 0123456789 >&2");
    req.output_cap_bytes = Some(4);
    let out = c.exec(req, T).unwrap();
    assert_eq!(out.stdout, b"abcd");
    assert_eq!(out.stderr, b"0123");
    assert_eq!(out.truncated.len(), 2);
    for (stream, path) in &out.truncated {
        let want: &[u8] = if *stream == Stream::Stdout { b"abcdefghij" } else { b"0123456789" };
        assert_eq!(std::fs::read(path).unwrap(), want);
    }
}

#[test]
fn binary_output_is_byte_exact() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let all: Vec<u8> = (0..=255u8).cycle().take(256 * 1000 + 17).collect();
    std::fs::write(agent.work.join("bytes.bin"), &all).unwrap();
    let out = c.exec(ExecRequest::argv(&["cat", "bytes.bin"]), T).unwrap();
    assert_eq!(out.stdout, all);
}

fn read_output(c: &capsule_agent::client::AgentClient, pid: u32, so: u64, se: u64) -> ProcessOutput {
    let op = Op::ReadProcessOutput { pid, stdout_offset: so, stderr_offset: se, max_bytes: 1 << 20 };
    match c.call_reply(op, T).unwrap() {
        Reply::ProcessOutput(o) => o,
        other => panic!("unexpected {other:?}"),
    }
}

fn list(c: &capsule_agent::client::AgentClient) -> Vec<ProcessInfo> {
    match c.call_reply(Op::ListProcesses, T).unwrap() {
        Reply::Processes(p) => p,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn background_process_output_is_read_by_offsets_and_it_can_be_killed() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let mut req = ExecRequest::shell("echo first; echo oops >&2; read line; echo \"got $line\"; exec sleep 300");
    req.background = true;
    req.stdin = Some(b"input\n".to_vec());
    let pid = match c.call_reply(Op::Exec(req), T).unwrap() {
        Reply::Started { pid } => pid,
        other => panic!("unexpected {other:?}"),
    };
    assert!(eventually(Duration::from_secs(10), || read_output(&c, pid, 0, 0).stdout == b"first\ngot input\n"));
    let out = read_output(&c, pid, 6, 0);
    assert_eq!(out.stdout, b"got input\n");
    assert_eq!(out.stderr, b"oops\n");
    assert_eq!((out.next_stdout_offset, out.next_stderr_offset), (16, 5));
    assert_eq!(out.exit, None);
    let again = read_output(&c, pid, 16, 5);
    assert!(again.stdout.is_empty() && again.stderr.is_empty());

    // A new connection sees the same process: processes belong to the agent.
    drop(c);
    let c = agent.connect();
    let listed = list(&c);
    let me = listed.iter().find(|p| p.pid == pid).expect("listed");
    assert!(me.background && me.exit.is_none());

    c.call_reply(Op::Signal { pid, signal: 9 }, T).unwrap();
    assert!(eventually(Duration::from_secs(10), || read_output(&c, pid, 0, 0).exit.is_some()));
    let exit = read_output(&c, pid, 0, 0).exit.unwrap();
    assert_eq!(exit.signal, Some(9));
    assert_eq!(exit.stdout_bytes, 16);
    assert!(!process_alive(pid));

    let err =
        c.call_reply(Op::ReadProcessOutput { pid: u32::MAX, stdout_offset: 0, stderr_offset: 0, max_bytes: 1 }, T);
    assert!(matches!(err, Err(ClientError::Agent(ref e)) if e.kind == ErrorKind::NotFound), "{err:?}");
    let err = c.call_reply(Op::Signal { pid, signal: 1000 }, T);
    assert!(matches!(err, Err(ClientError::Agent(ref e)) if e.kind == ErrorKind::InvalidArgument), "{err:?}");
}

#[test]
fn machine_wide_operations_are_refused_on_a_host() {
    let agent = TestAgent::start();
    let c = agent.connect();
    for op in [Op::SetClock { unix_time_ns: 0 }, Op::AddEntropy { bytes: vec![1; 32] }, Op::Shutdown { reboot: false }]
    {
        let err = c.call_reply(op, T);
        assert!(matches!(err, Err(ClientError::Agent(ref e)) if e.kind == ErrorKind::Unsupported), "{err:?}");
    }
    assert_eq!(c.call_reply(Op::Ping, T).unwrap(), Reply::Pong);
}
