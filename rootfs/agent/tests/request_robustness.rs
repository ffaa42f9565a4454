//! Deterministic robustness test of the request and cgroup paths (the
//! cargo-fuzz target `fuzz/exec_request` explores further): thousands of
//! mutated valid `Exec`/`RunCode`/`ResizePty` frames go through the agent's
//! validation, random and mutated cgroup file contents through its parsers,
//! and random guest sizes and limits through the policy. Only results or
//! errors may come out, never a panic, and resolved limits stay in bounds.

use capsule_agent::cgroup::events;
use capsule_agent::cgroup::limits::{resolve_request, LimitPolicy};
use capsule_agent::frame::{encode_frame, FrameDecoder};
use capsule_agent::process::validate_exec;
use capsule_agent::protocol::{
    ClientFrame, ClientMessage, Command, ExecRequest, Language, Op, ProcessLimits, PtySize, Request, RunCodeRequest,
};
use capsule_agent::pty;

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

fn guest() -> LimitPolicy {
    LimitPolicy::for_guest(512 << 20, 32768, 4096).unwrap()
}

fn valid_requests() -> Vec<ClientFrame> {
    let exec = ExecRequest {
        command: Command::Argv(vec!["python3".into(), "-i".into()]),
        cwd: Some("sub".into()),
        env: vec![("K".into(), "V".into())],
        stdin: Some(b"print(1)\n".to_vec()),
        background: true,
        output_cap_bytes: Some(1 << 20),
        limits: Some(ProcessLimits { pids_max: Some(64), memory_max_bytes: Some(64 << 20) }),
        pty: Some(PtySize { rows: 24, cols: 80 }),
    };
    let ops = vec![
        Op::Exec(exec),
        Op::Exec(ExecRequest::shell("bomb(){ bomb|bomb& }; bomb")),
        Op::RunCode(RunCodeRequest {
            context: "c".into(),
            language: Language::Bash,
            code: "echo".into(),
            output_cap_bytes: None,
            limits: Some(ProcessLimits { pids_max: Some(128), memory_max_bytes: None }),
        }),
        Op::ResizePty { pid: 7, size: PtySize { rows: 40, cols: 120 } },
        Op::WriteProcess { pid: 7, data: b"hello\n".to_vec(), close_stdin: true },
    ];
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| ClientFrame {
            id: i as u64 + 1,
            body: ClientMessage::Request(Request { timeout_ms: Some(5), op }),
        })
        .collect()
}

/// Decodes one frame and validates what it asks, as the agent does before starting anything.
fn check(bytes: &[u8], policy: &LimitPolicy) -> bool {
    let mut decoder = FrameDecoder::new();
    decoder.push(bytes);
    let Ok(Some(ClientFrame { body: ClientMessage::Request(request), .. })) = decoder.next_frame::<ClientFrame>()
    else {
        return false;
    };
    match request.op {
        Op::Exec(req) => {
            if let Ok(Some(l)) = validate_exec(&req, Some(policy)) {
                assert!((1..=policy.pids_ceiling).contains(&l.pids_max), "{l:?}");
                assert!(l.memory_high_bytes <= l.memory_max_bytes && l.memory_max_bytes <= policy.memory_ceiling_bytes);
            }
            let _ = validate_exec(&req, None);
        }
        Op::RunCode(req) => {
            let _ = resolve_request(Some(policy), req.limits.as_ref());
            let _ = resolve_request(None, req.limits.as_ref());
        }
        Op::ResizePty { size, .. } => {
            let _ = pty::size_problem(size);
        }
        _ => {}
    }
    true
}

#[test]
fn mutated_requests_are_validated_without_panics() {
    let policy = guest();
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    for frame in valid_requests() {
        let mut wire = Vec::new();
        encode_frame(&frame, &mut wire).unwrap();
        assert!(check(&wire, &policy), "the unmutated frame decodes");
        for _ in 0..2000 {
            let mut bytes = wire.clone();
            for _ in 0..1 + rng.below(6) {
                // Leave the length header alone half the time, so payloads decode.
                let from = if rng.below(2) == 0 { 4.min(bytes.len() - 1) } else { 0 };
                let at = from + rng.below(bytes.len() - from);
                match rng.below(3) {
                    0 => bytes[at] ^= 1 << rng.below(8),
                    1 => bytes[at] = rng.next() as u8,
                    _ => bytes[at] = [0, 1, 0x7f, 0x80, 0xff][rng.below(5)],
                }
            }
            check(&bytes, &policy);
        }
    }
}

#[test]
fn cgroup_file_contents_never_panic_the_parsers() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let samples: [&[u8]; 4] = [
        b"max 3\n",
        b"low 0\nhigh 1\nmax 2\noom 3\noom_kill 4\noom_group_kill 0\n",
        b"populated 1\nfrozen 0\n",
        b"12\n345\n",
    ];
    for _ in 0..5000 {
        let mut bytes: Vec<u8> = if rng.below(2) == 0 {
            samples[rng.below(samples.len())].to_vec()
        } else {
            let alphabet = b"0123456789 \nmaxpopulatedoom_kill\x00\xff";
            (0..rng.below(64)).map(|_| alphabet[rng.below(alphabet.len())]).collect()
        };
        if !bytes.is_empty() {
            for _ in 0..rng.below(4) {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
        }
        let _ = events::parse_pids_events(&bytes);
        let _ = events::parse_oom_kills(&bytes);
        let _ = events::parse_cgroup_events(&bytes);
        let _ = events::for_each_pid(&bytes, |_| {});
    }
    assert!(events::parse_pids_events(&vec![b'1'; events::MAX_CGROUP_FILE_BYTES + 1]).is_err());
}

#[test]
fn any_guest_size_and_any_request_give_a_policy_or_an_error_with_limits_in_bounds() {
    let mut rng = Rng(0xfeed_beef_0bad_f00d);
    let pick = |rng: &mut Rng| match rng.below(4) {
        0 => 0,
        1 => u64::MAX - rng.below(3) as u64,
        2 => rng.next() % (64 << 30),
        _ => rng.next(),
    };
    for _ in 0..20_000 {
        let Ok(policy) = LimitPolicy::for_guest(pick(&mut rng), pick(&mut rng), pick(&mut rng)) else { continue };
        assert!(policy.default_pids_max <= policy.pids_ceiling);
        assert!(policy.default_memory_max_bytes <= policy.memory_ceiling_bytes);
        let asked = ProcessLimits {
            pids_max: (rng.below(2) == 0).then(|| pick(&mut rng) as u32),
            memory_max_bytes: (rng.below(2) == 0).then(|| pick(&mut rng)),
        };
        if let Ok(l) = policy.resolve(Some(&asked)) {
            assert!(l.pids_max >= 1 && l.pids_max <= policy.pids_ceiling);
            assert!(l.memory_high_bytes <= l.memory_max_bytes && l.memory_max_bytes <= policy.memory_ceiling_bytes);
        }
    }
}
