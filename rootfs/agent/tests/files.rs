//! File operations against the real agent binary: round trips, ranges,
//! directories, and every error kind.

mod fixture;

use std::time::Duration;

use capsule_agent::client::{AgentClient, ClientError};
use capsule_agent::protocol::{
    DirEntry, ErrorKind, FileKind, Op, Reply, WriteFileRequest, WritePosition, MAX_FILE_CHUNK_BYTES,
};
use fixture::TestAgent;

const T: Option<Duration> = Some(Duration::from_secs(60));

fn kind_of(r: Result<Reply, ClientError>) -> ErrorKind {
    match r {
        Err(ClientError::Agent(e)) => e.kind,
        other => panic!("expected an agent error, got {other:?}"),
    }
}

fn write(path: &str, position: WritePosition, data: &[u8]) -> Op {
    Op::WriteFile(WriteFileRequest {
        path: path.into(),
        position,
        data: data.to_vec(),
        mode: None,
        create_parents: false,
    })
}

fn read(c: &AgentClient, path: &str, offset: u64, length: u64) -> (Vec<u8>, u64) {
    match c.call_reply(Op::ReadFile { path: path.into(), offset, length }, T).unwrap() {
        Reply::FileData { data, size } => (data, size),
        other => panic!("unexpected {other:?}"),
    }
}

fn entries(c: &AgentClient, path: &str, depth: u32) -> Vec<DirEntry> {
    match c.call_reply(Op::ListDir { path: path.into(), depth }, T).unwrap() {
        Reply::Entries(e) => e,
        other => panic!("unexpected {other:?}"),
    }
}

/// Deterministic incompressible bytes (xorshift64).
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn every_byte_value_round_trips() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let all: Vec<u8> = (0..=255u8).collect();
    assert_eq!(c.write_file("deep/er/bytes.bin", &all, Some(0o600)).unwrap(), 256);
    assert_eq!(c.read_file("deep/er/bytes.bin").unwrap(), all);
    assert_eq!(std::fs::read(agent.work.join("deep/er/bytes.bin")).unwrap(), all);
    match c.call_reply(Op::Stat { path: "deep/er/bytes.bin".into() }, T).unwrap() {
        Reply::Stat(s) => assert_eq!((s.kind, s.size, s.mode), (FileKind::File, 256, 0o600)),
        other => panic!("unexpected {other:?}"),
    }
    // Empty files too.
    c.write_file("empty", &[], None).unwrap();
    assert_eq!(c.read_file("empty").unwrap(), Vec::<u8>::new());
}

#[test]
fn a_hundred_mebibyte_file_round_trips_in_chunks() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let data = pseudo_random(100 * 1024 * 1024 + 12345, 0x9e37_79b9_7f4a_7c15);
    let abs = agent.dir.path().join("big.bin");
    let abs = abs.to_str().unwrap();
    assert_eq!(c.write_file_from(abs, &data[..], None).unwrap(), data.len() as u64);
    let back = c.read_file(abs).unwrap();
    assert!(back == data, "100 MiB came back different");
}

#[test]
fn ranges_positions_and_appends() {
    let agent = TestAgent::start();
    let c = agent.connect();
    c.call_reply(write("f", WritePosition::Truncate, b"0123456789"), T).unwrap();
    assert_eq!(read(&c, "f", 3, 4), (b"3456".to_vec(), 10));
    assert_eq!(read(&c, "f", 8, 100), (b"89".to_vec(), 10));
    assert_eq!(read(&c, "f", 50, 10), (Vec::new(), 10));
    c.call_reply(write("f", WritePosition::At(2), b"ab"), T).unwrap();
    c.call_reply(write("f", WritePosition::Append, b"XY"), T).unwrap();
    assert_eq!(c.read_file("f").unwrap(), b"01ab456789XY");
    c.call_reply(write("f", WritePosition::Truncate, b"new"), T).unwrap();
    assert_eq!(c.read_file("f").unwrap(), b"new");
    // A read asks for at most one chunk.
    c.write_file("big", &vec![7u8; MAX_FILE_CHUNK_BYTES + 10], None).unwrap();
    let (data, size) = read(&c, "big", 0, u64::MAX);
    assert_eq!((data.len(), size), (MAX_FILE_CHUNK_BYTES, MAX_FILE_CHUNK_BYTES as u64 + 10));
}

#[test]
fn directories_mkdir_list_rename_remove() {
    let agent = TestAgent::start();
    let c = agent.connect();
    c.call_reply(Op::MakeDir { path: "a/b/c".into(), mode: Some(0o700) }, T).unwrap();
    c.call_reply(Op::MakeDir { path: "a/b/c".into(), mode: None }, T).unwrap(); // idempotent, like mkdir -p
    c.write_file("a/top.txt", b"t", None).unwrap();
    c.write_file("a/b/mid.txt", b"mm", None).unwrap();
    std::os::unix::fs::symlink("top.txt", agent.work.join("a/link")).unwrap();

    let names = |d: Vec<DirEntry>| d.into_iter().map(|e| e.path).collect::<Vec<_>>();
    assert_eq!(names(entries(&c, "a", 1)), ["b", "link", "top.txt"]);
    assert_eq!(names(entries(&c, "a", 3)), ["b", "b/c", "b/mid.txt", "link", "top.txt"]);
    let listed = entries(&c, "a", 2);
    let link = listed.iter().find(|e| e.path == "link").unwrap();
    assert_eq!(link.stat.kind, FileKind::Symlink);
    assert_eq!(link.stat.symlink_target.as_deref(), Some("top.txt"));
    assert_eq!(listed.iter().find(|e| e.path == "b/mid.txt").unwrap().stat.size, 2);

    c.call_reply(Op::Rename { from: "a/b".into(), to: "a/renamed".into() }, T).unwrap();
    assert_eq!(c.read_file("a/renamed/mid.txt").unwrap(), b"mm");
    assert_eq!(
        kind_of(c.call_reply(Op::Remove { path: "a".into(), recursive: false }, T)),
        ErrorKind::DirectoryNotEmpty
    );
    c.call_reply(Op::Remove { path: "a/link".into(), recursive: false }, T).unwrap();
    assert!(agent.work.join("a/top.txt").exists(), "removing a symlink leaves its target");
    c.call_reply(Op::Remove { path: "a".into(), recursive: true }, T).unwrap();
    assert!(!agent.work.join("a").exists());
}

#[test]
fn errors_map_to_precise_kinds() {
    let agent = TestAgent::start();
    let c = agent.connect();
    c.write_file("file", b"x", None).unwrap();
    c.call_reply(Op::MakeDir { path: "dir".into(), mode: None }, T).unwrap();

    let read_op = |p: &str| Op::ReadFile { path: p.into(), offset: 0, length: 10 };
    assert_eq!(kind_of(c.call_reply(read_op("missing"), T)), ErrorKind::NotFound);
    assert_eq!(kind_of(c.call_reply(read_op("file/inner"), T)), ErrorKind::NotADirectory);
    assert_eq!(kind_of(c.call_reply(read_op("dir"), T)), ErrorKind::IsADirectory);
    assert_eq!(kind_of(c.call_reply(write("dir", WritePosition::Truncate, b"x"), T)), ErrorKind::IsADirectory);
    assert_eq!(kind_of(c.call_reply(write("missing/f", WritePosition::Truncate, b"x"), T)), ErrorKind::NotFound);
    assert_eq!(kind_of(c.call_reply(write("nope", WritePosition::At(3), b"x"), T)), ErrorKind::NotFound);
    assert_eq!(kind_of(c.call_reply(Op::Stat { path: "missing".into() }, T)), ErrorKind::NotFound);
    assert_eq!(kind_of(c.call_reply(Op::ListDir { path: "file".into(), depth: 1 }, T)), ErrorKind::NotADirectory);
    assert_eq!(kind_of(c.call_reply(Op::ListDir { path: "dir".into(), depth: 0 }, T)), ErrorKind::InvalidArgument);
    assert_eq!(kind_of(c.call_reply(Op::MakeDir { path: "file".into(), mode: None }, T)), ErrorKind::AlreadyExists);
    assert_eq!(kind_of(c.call_reply(Op::MakeDir { path: "file/sub".into(), mode: None }, T)), ErrorKind::NotADirectory);
    assert_eq!(kind_of(c.call_reply(Op::Remove { path: "missing".into(), recursive: true }, T)), ErrorKind::NotFound);
    assert_eq!(kind_of(c.call_reply(Op::Rename { from: "missing".into(), to: "x".into() }, T)), ErrorKind::NotFound);
    assert_eq!(
        kind_of(c.call_reply(Op::Rename { from: "dir".into(), to: "file".into() }, T)),
        ErrorKind::NotADirectory
    );
    assert_eq!(kind_of(c.call_reply(read_op(""), T)), ErrorKind::InvalidArgument);
    assert_eq!(
        kind_of(c.call_reply(write("big", WritePosition::Truncate, &vec![0; MAX_FILE_CHUNK_BYTES + 1]), T)),
        ErrorKind::TooLarge
    );
    assert!(!agent.work.join("big").exists(), "an oversized chunk writes nothing");
}

/// Tests run as root, which bypasses file permission bits, so permission is
/// tested where the kernel refuses even root: procfs refuses opening another
/// process's `environ` for writing (EACCES), and sysfs refuses creating
/// directories (EPERM).
#[test]
fn permission_denied_even_as_root() {
    let agent = TestAgent::start();
    let c = agent.connect();
    assert_eq!(
        kind_of(c.call_reply(write("/proc/1/environ", WritePosition::Truncate, b"x"), T)),
        ErrorKind::PermissionDenied
    );
    assert_eq!(
        kind_of(c.call_reply(Op::MakeDir { path: "/sys/capsule-test".into(), mode: None }, T)),
        ErrorKind::PermissionDenied
    );
}

#[test]
fn reading_a_fifo_is_refused_at_once_instead_of_hanging() {
    let agent = TestAgent::start();
    let c = agent.connect();
    let fifo = agent.work.join("pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    let started = std::time::Instant::now();
    let result =
        c.call_reply(Op::ReadFile { path: "pipe".into(), offset: 0, length: 10 }, Some(Duration::from_secs(5)));
    assert!(started.elapsed() < Duration::from_secs(2), "reading a FIFO took {:?}", started.elapsed());
    match result {
        Err(ClientError::Agent(e)) => {
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e:?}");
            assert!(e.message.contains("FIFO"), "{}", e.message);
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    // The agent still answers: no worker is stuck on the FIFO.
    assert_eq!(c.call_reply(Op::Ping, T).unwrap(), Reply::Pong);
}

#[test]
fn read_file_capped_refuses_a_file_over_the_cap() {
    let agent = TestAgent::start();
    let c = agent.connect();
    std::fs::write(agent.work.join("big"), vec![7u8; 1000]).unwrap();
    match c.read_file_capped("big", 999) {
        Err(ClientError::TooLarge { limit_bytes, what }) => {
            assert_eq!(limit_bytes, 999);
            assert!(what.contains("big"), "{what}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(c.read_file_capped("big", 1000).unwrap(), vec![7u8; 1000]);
}
