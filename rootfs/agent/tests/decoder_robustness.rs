//! Deterministic robustness test of the frame decoder (the cargo-fuzz target
//! `fuzz/frame_decoder` explores further): thousands of pseudo-random and
//! mutated-valid byte strings, fed in random pieces, must only ever produce
//! frames or errors, never a panic or an unbounded buffer.

use capsule_agent::frame::{encode_frame, FrameDecoder, FRAME_HEADER_BYTES};
use capsule_agent::protocol::{
    ClientFrame, ClientMessage, Command, ExecRequest, Hello, Language, Op, ProcessLimits, PtySize, Request,
    RunCodeRequest, WriteFileRequest, WritePosition, MAX_FRAME_BYTES,
};

/// xorshift64: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn valid_frames() -> Vec<ClientFrame> {
    let ops = vec![
        Op::Ping,
        Op::Exec(ExecRequest {
            command: Command::Argv(vec!["ls".into(), "-la".into()]),
            cwd: Some("/tmp".into()),
            env: vec![("K".into(), "V".into())],
            stdin: Some(vec![1, 2, 3]),
            background: true,
            output_cap_bytes: Some(10),
            limits: Some(ProcessLimits { pids_max: Some(64), memory_max_bytes: None }),
            pty: Some(PtySize { rows: 24, cols: 80 }),
        }),
        Op::RunCode(RunCodeRequest {
            context: "default".into(),
            language: Language::Python,
            code: "1+1".into(),
            output_cap_bytes: None,
            limits: None,
        }),
        Op::WriteFile(WriteFileRequest {
            path: "/a/b".into(),
            position: WritePosition::At(99),
            data: vec![0xee; 300],
            mode: Some(0o644),
            create_parents: true,
        }),
        Op::ReadProcessOutput { pid: 7, stdout_offset: 1 << 40, stderr_offset: 3, max_bytes: 5 },
        Op::AddEntropy { bytes: vec![9; 64] },
    ];
    let mut frames = vec![
        ClientFrame { id: 0, body: ClientMessage::Hello(Hello { version: 1, client: "fuzz".into() }) },
        ClientFrame { id: 3, body: ClientMessage::Cancel },
    ];
    for (i, op) in ops.into_iter().enumerate() {
        frames
            .push(ClientFrame { id: i as u64 + 1, body: ClientMessage::Request(Request { timeout_ms: Some(5), op }) });
    }
    frames
}

/// Feeds `bytes` in random pieces; returns how many frames decoded before an error or the end.
fn feed(bytes: &[u8], rng: &mut Rng) -> usize {
    let mut dec = FrameDecoder::new();
    let mut decoded = 0;
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = 1 + rng.below(rest.len());
        dec.push(&rest[..n]);
        rest = &rest[n..];
        loop {
            match dec.next_frame::<ClientFrame>() {
                Ok(Some(_)) => decoded += 1,
                Ok(None) => break,
                Err(_) => return decoded,
            }
        }
        assert!(dec.buffered() <= FRAME_HEADER_BYTES + MAX_FRAME_BYTES);
    }
    decoded
}

#[test]
fn random_bytes_never_panic_the_decoder() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for _ in 0..3000 {
        let len = rng.below(512);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Often give it a plausible small header so payload decoding is exercised.
        if len >= 4 && rng.below(2) == 0 {
            bytes[..4].copy_from_slice(&((len - 4) as u32).to_le_bytes());
        }
        feed(&bytes, &mut rng);
    }
}

#[test]
fn mutated_valid_frames_never_panic_the_decoder() {
    let frames = valid_frames();
    let mut wire = Vec::new();
    for f in &frames {
        encode_frame(f, &mut wire).unwrap();
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    assert_eq!(feed(&wire, &mut rng), frames.len(), "unmutated stream decodes whole");
    for _ in 0..5000 {
        let mut bytes = wire.clone();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(bytes.len());
            match rng.below(4) {
                0 => bytes[at] ^= 1 << rng.below(8),
                1 => bytes[at] = rng.next() as u8,
                2 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, rng.next() as u8),
            }
            if bytes.is_empty() {
                break;
            }
        }
        feed(&bytes, &mut rng);
    }
}
