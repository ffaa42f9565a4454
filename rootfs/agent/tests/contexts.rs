//! Persistent language contexts against the real interpreters of this host
//! (python3, node, bash), through `Contexts` directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use capsule_agent::cancel::CancelToken;
use capsule_agent::context::{Contexts, ContextsConfig, RESTART_ERROR_NAME};
use capsule_agent::protocol::{
    AgentError, CodeError, CodeOutcome, ErrorKind, Event, Language, RichResult, RunCodeRequest, Stream,
};

struct Fixture {
    contexts: Contexts,
    work: tempfile::TempDir,
    _state: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let work = tempfile::tempdir().expect("work dir");
    let state = tempfile::tempdir().expect("state dir");
    let config = ContextsConfig {
        work_dir: work.path().to_path_buf(),
        state_dir: state.path().to_path_buf(),
        ..ContextsConfig::default()
    };
    Fixture { contexts: Contexts::new(config), work, _state: state }
}

/// What one cell produced.
#[derive(Debug)]
struct Run {
    events: Vec<(Instant, Event)>,
    outcome: Result<CodeOutcome, AgentError>,
}

impl Run {
    fn outcome(&self) -> &CodeOutcome {
        self.outcome.as_ref().unwrap_or_else(|e| panic!("cell failed: {e}; events: {:?}", self.events))
    }
    fn stream(&self, which: Stream) -> String {
        let mut out = Vec::new();
        for (_, e) in &self.events {
            if let Event::Output { stream, data } = e {
                if *stream == which {
                    out.extend_from_slice(data);
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    fn stdout(&self) -> String {
        self.stream(Stream::Stdout)
    }
    fn results(&self) -> Vec<&RichResult> {
        self.events.iter().filter_map(|(_, e)| if let Event::Result(r) = e { Some(r) } else { None }).collect()
    }
    fn errors(&self) -> Vec<&CodeError> {
        self.events.iter().filter_map(|(_, e)| if let Event::Error(r) = e { Some(r) } else { None }).collect()
    }
    /// The text/plain of the main result.
    fn value(&self) -> Option<String> {
        self.results().iter().find(|r| r.is_main_result).map(|r| {
            let (_, data) = r.data.iter().find(|(m, _)| m == "text/plain").expect("text/plain in the main result");
            String::from_utf8_lossy(data).into_owned()
        })
    }
    fn assert_clean(&self) {
        let errors = self.errors();
        assert!(errors.is_empty(), "unexpected errors {errors:?}; stderr {:?}", self.stream(Stream::Stderr));
    }
}

fn run_with(contexts: &Contexts, context: &str, language: Language, code: &str, cancel: &CancelToken) -> Run {
    let req = RunCodeRequest {
        context: context.to_string(),
        language,
        code: code.to_string(),
        output_cap_bytes: None,
        limits: None,
    };
    let mut events = Vec::new();
    let outcome = contexts.run_code(&req, cancel, &mut |e| events.push((Instant::now(), e)));
    Run { events, outcome }
}

fn run(f: &Fixture, context: &str, language: Language, code: &str) -> Run {
    run_with(&f.contexts, context, language, code, &CancelToken::with_timeout(Some(Duration::from_secs(60))))
}

fn py(f: &Fixture, context: &str, code: &str) -> Run {
    run(f, context, Language::Python, code)
}

#[test]
fn python_state_persists_and_last_expression_is_the_result() {
    let f = fixture();
    let a = py(&f, "p", "x = 40\ndef add(n):\n    return x + n");
    a.assert_clean();
    assert_eq!(a.value(), None, "a cell ending in a def has no result");
    assert_eq!(a.outcome().execution_count, 1);
    let b = py(&f, "p", "y = add(2)\ny");
    b.assert_clean();
    assert_eq!(b.value().as_deref(), Some("42"));
    assert_eq!(b.outcome().execution_count, 2);
    assert!(!b.outcome().context_restarted);
    // None gives no result; a string's repr is the text.
    assert_eq!(py(&f, "p", "None").value(), None);
    assert_eq!(py(&f, "p", "'a' * 3").value().as_deref(), Some("'aaa'"));
    // Top-level await works in Python cells too.
    let awaited = py(&f, "p", "import asyncio\nawait asyncio.sleep(0.01)\nx + 2");
    assert_eq!(awaited.value().as_deref(), Some("42"));
    // _repr_html_ becomes text/html.
    let html = py(&f, "p", "class T:\n    def _repr_html_(self):\n        return '<b>t</b>'\nT()");
    let main = html.results().into_iter().find(|r| r.is_main_result).expect("main result");
    assert!(main.data.iter().any(|(m, d)| m == "text/html" && d == b"<b>t</b>"), "{main:?}");
    // display() shows a value at once, as in Jupyter.
    let shown = py(&f, "p", "print('a')\ndisplay(T())\nprint('b')");
    let mut kinds: Vec<bool> = shown.events.iter().map(|(_, e)| matches!(e, Event::Result(_))).collect();
    kinds.dedup();
    assert_eq!(kinds, [false, true, false], "output, display, output: {:?}", shown.events);
    let displayed = shown.results()[0];
    assert!(!displayed.is_main_result);
    assert!(displayed.data.iter().any(|(m, _)| m == "text/html"));
    let info = f.contexts.list();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].name, "p");
    assert_eq!(info[0].language, Language::Python);
    assert_eq!(info[0].execution_count, 7);
    assert!(info[0].pid.is_some());
}

#[test]
fn two_contexts_are_isolated_and_run_in_parallel() {
    let f = fixture();
    py(&f, "one", "v = 1").assert_clean();
    py(&f, "two", "v = 2").assert_clean();
    assert_eq!(py(&f, "one", "v").value().as_deref(), Some("1"));
    assert_eq!(py(&f, "two", "v").value().as_deref(), Some("2"));
    let undefined = py(&f, "two", "del v\nv");
    assert_eq!(undefined.errors()[0].name, "NameError");
    assert_eq!(py(&f, "one", "v").value().as_deref(), Some("1"));

    // Two sleeping cells in two contexts overlap; on one context they queue.
    let contexts = Arc::new(f.contexts);
    let timed = |names: [&'static str; 2]| {
        let start = Instant::now();
        let handles: Vec<_> = names
            .into_iter()
            .map(|name| {
                let c = contexts.clone();
                std::thread::spawn(move || {
                    let cancel = CancelToken::with_timeout(Some(Duration::from_secs(30)));
                    run_with(&c, name, Language::Python, "import time; time.sleep(0.8)", &cancel).assert_clean();
                })
            })
            .collect();
        for h in handles {
            h.join().expect("thread");
        }
        start.elapsed()
    };
    let parallel = timed(["one", "two"]);
    let queued = timed(["one", "one"]);
    assert!(parallel < Duration::from_millis(1500), "two contexts took {parallel:?}");
    assert!(queued >= Duration::from_millis(1600), "one context ran two cells at once: {queued:?}");
}

#[test]
fn python_stdout_streams_while_the_cell_runs() {
    let f = fixture();
    let r = py(&f, "s", "import time, os, sys\nprint('first')\ntime.sleep(0.4)\nos.write(1, b'raw\\n')\nprint('err', file=sys.stderr)\n'end'");
    r.assert_clean();
    let outputs: Vec<&(Instant, Event)> =
        r.events.iter().filter(|(_, e)| matches!(e, Event::Output { stream: Stream::Stdout, .. })).collect();
    assert!(outputs.len() >= 2, "expected several stdout chunks, got {outputs:?}");
    // The first print was emitted while the cell still slept, not at its end.
    let gap = outputs[outputs.len() - 1].0.duration_since(outputs[0].0);
    assert!(gap >= Duration::from_millis(300), "output was not streamed: first and last chunks {gap:?} apart");
    assert_eq!(r.stdout(), "first\nraw\n");
    assert_eq!(r.stream(Stream::Stderr), "err\n");
    // Output comes before the result.
    assert!(matches!(r.events.last(), Some((_, Event::Result(_)))), "{:?}", r.events);
    assert_eq!(r.value().as_deref(), Some("'end'"));
}

#[test]
fn python_exception_has_a_clean_traceback() {
    let f = fixture();
    let r = py(&f, "e", "a = 1\n\ndef f():\n    return a / 0\n\nf()");
    r.outcome();
    let errors = r.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = errors[0];
    assert_eq!(e.name, "ZeroDivisionError");
    assert_eq!(e.value, "division by zero");
    let tb = e.traceback.join("\n");
    assert!(tb.contains("line 4, in f"), "{tb}");
    assert!(tb.contains("return a / 0"), "source line missing: {tb}");
    assert!(tb.contains("line 6"), "{tb}");
    assert!(!tb.contains("python_driver"), "driver frames leaked: {tb}");
    assert!(!tb.contains('\u{1b}'), "ANSI escapes: {tb}");
    // A syntax error is an error too, and the context lives on.
    let s = py(&f, "e", "def (:");
    assert_eq!(s.errors()[0].name, "SyntaxError");
    assert_eq!(py(&f, "e", "a + 1").value().as_deref(), Some("2"));
}

#[test]
fn python_matplotlib_figure_comes_back_as_png() {
    let f = fixture();
    let probe = py(&f, "m", "import importlib.util\nimportlib.util.find_spec('matplotlib') is not None");
    assert_eq!(
        probe.value().as_deref(),
        Some("True"),
        "matplotlib is missing on this host: run `python3 -m pip install matplotlib numpy` (CI installs it)"
    );
    let r = py(&f, "m", "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\nNone");
    r.assert_clean();
    let figures: Vec<&RichResult> = r.results().into_iter().filter(|r| !r.is_main_result).collect();
    assert_eq!(figures.len(), 1, "{:?}", r.events);
    let png = &figures[0].data.iter().find(|(m, _)| m == "image/png").expect("image/png").1;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(figures[0].data.iter().any(|(m, d)| m == "text/plain" && d.starts_with(b"<Figure")));
    // plt.show() captures at once (before later output) and figures are closed after capture.
    let shown = py(&f, "m", "plt.plot([1]); plt.show()\nprint('after')\nlen(plt.get_fignums())");
    shown.assert_clean();
    let mut kinds: Vec<&str> = shown
        .events
        .iter()
        .map(|(_, e)| match e {
            Event::Result(r) if r.is_main_result => "value",
            Event::Result(_) => "figure",
            Event::Output { .. } => "output",
            _ => "other",
        })
        .collect();
    kinds.dedup();
    assert_eq!(kinds, ["figure", "output", "value"]);
    assert_eq!(shown.value().as_deref(), Some("0"));
}

#[test]
fn python_timeout_interrupts_and_keeps_state() {
    let f = fixture();
    py(&f, "t", "kept = 'yes'").assert_clean();
    let start = Instant::now();
    let cancel = CancelToken::with_timeout(Some(Duration::from_millis(300)));
    let r = run_with(&f.contexts, "t", Language::Python, "import time\nwhile True:\n    time.sleep(0.01)", &cancel);
    let outcome = r.outcome();
    assert!(outcome.timed_out);
    assert!(!outcome.context_restarted);
    assert!(start.elapsed() < Duration::from_secs(2), "interrupt took {:?}", start.elapsed());
    assert_eq!(r.errors().iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["KeyboardInterrupt"]);
    let tb = r.errors()[0].traceback.join("\n");
    assert!(tb.contains("<cell-2>") && !tb.contains("python_driver"), "{tb}");
    assert_eq!(py(&f, "t", "kept").value().as_deref(), Some("'yes'"));
}

#[test]
fn python_cell_that_ignores_sigint_is_killed_and_restarted() {
    let f = fixture();
    py(&f, "k", "lost = 1").assert_clean();
    let pid_before = f.contexts.list()[0].pid;
    let cancel = CancelToken::with_timeout(Some(Duration::from_millis(200)));
    let start = Instant::now();
    let r = run_with(
        &f.contexts,
        "k",
        Language::Python,
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass",
        &cancel,
    );
    let outcome = r.outcome();
    assert!(outcome.timed_out && outcome.context_restarted, "{outcome:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    let e = r.errors();
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].name, RESTART_ERROR_NAME);
    assert!(e[0].value.contains("state") && e[0].value.contains("lost"), "{}", e[0].value);
    let next = py(&f, "k", "'lost' in globals()");
    assert_eq!(next.value().as_deref(), Some("False"));
    assert_ne!(f.contexts.list()[0].pid, pid_before);
}

#[test]
fn python_interpreter_that_exits_is_reported_and_replaced() {
    let f = fixture();
    py(&f, "x", "gone = 1").assert_clean();
    let r = py(&f, "x", "import os\nprint('bye', flush=True)\nos._exit(3)");
    assert!(r.outcome().context_restarted);
    assert_eq!(r.stdout(), "bye\n");
    assert!(r.errors()[0].value.contains("exited with status 3"), "{:?}", r.errors());
    assert_eq!(py(&f, "x", "'gone' in globals()").value().as_deref(), Some("False"));
    // sys.exit is an exception in the cell, not the end of the context.
    let exit = py(&f, "x", "import sys\nsys.exit(4)");
    assert_eq!(exit.errors()[0].name, "SystemExit");
    assert!(!exit.outcome().context_restarted);
}

#[test]
fn cancel_interrupts_the_cell_and_fails_the_request() {
    let f = fixture();
    py(&f, "c", "state = 7").assert_clean();
    let cancel = CancelToken::new();
    let canceller = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        canceller.cancel();
    });
    let start = Instant::now();
    let r = run_with(&f.contexts, "c", Language::Python, "import time\ntime.sleep(30)", &cancel);
    t.join().expect("thread");
    assert!(start.elapsed() < Duration::from_secs(3), "cancel took {:?}", start.elapsed());
    let err = r.outcome.as_ref().expect_err("a cancelled cell fails the request");
    assert_eq!(err.kind, ErrorKind::Cancelled);
    assert_eq!(py(&f, "c", "state").value().as_deref(), Some("7"));
}

#[test]
fn names_and_languages_are_checked() {
    let f = fixture();
    for bad in ["", "a b", "x/y", &"n".repeat(65)] {
        let r = py(&f, bad, "1");
        let e = r.outcome.expect_err("bad name accepted");
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("1 to 64 characters"), "{}", e.message);
    }
    py(&f, "a.b-c_9", "1").assert_clean();
    let mismatch = run(&f, "a.b-c_9", Language::Bash, "echo hi").outcome.expect_err("language mismatch accepted");
    assert_eq!(mismatch.kind, ErrorKind::InvalidArgument);
    assert!(mismatch.message.contains("python context"), "{}", mismatch.message);
    let taken = f.contexts.create("a.b-c_9", Language::Python, None).expect_err("duplicate create");
    assert_eq!(taken.kind, ErrorKind::AlreadyExists);
    f.contexts.create("js", Language::JavaScript, None).expect("create");
    assert!(f.contexts.list().iter().any(|c| c.name == "js" && c.pid.is_some()));
    f.contexts.remove("js").expect("remove");
    assert_eq!(f.contexts.remove("js").expect_err("second remove").kind, ErrorKind::NotFound);
    py(&f, "r", "z = 1").assert_clean();
    f.contexts.reset("r").expect("reset");
    let after = py(&f, "r", "'z' in globals()");
    assert_eq!(after.value().as_deref(), Some("False"));
    assert_eq!(after.outcome().execution_count, 1);
}

#[test]
fn node_let_persists_and_top_level_await_works() {
    let f = fixture();
    let js = |code: &str| run(&f, "n", Language::JavaScript, code);
    let a = js("let n = 40; const add = (k) => n + k; function twice(v) { return 2 * v }");
    a.assert_clean();
    assert_eq!(a.value(), None);
    let b = js("const r = await new Promise((res) => setTimeout(() => res(add(2)), 50));\nr");
    b.assert_clean();
    assert_eq!(b.value().as_deref(), Some("42"));
    let c = js("console.log('log', twice(r)); ({ a: [1, 2], s: 'x' })");
    c.assert_clean();
    assert_eq!(c.stdout(), "log 84\n");
    assert_eq!(c.value().as_deref(), Some("{ a: [ 1, 2 ], s: 'x' }"));
    let e = js("null.foo");
    assert_eq!(e.errors()[0].name, "TypeError");
    assert!(e.errors()[0].value.contains("null"), "{:?}", e.errors());
    let thrown = js("async function boom() { throw new RangeError('deep') }\nawait boom()");
    assert_eq!(thrown.errors()[0].name, "RangeError");
    assert_eq!(thrown.errors()[0].value, "deep");
    // A timeout interrupts a busy loop and keeps the state.
    let cancel = CancelToken::with_timeout(Some(Duration::from_millis(300)));
    let spin = run_with(&f.contexts, "n", Language::JavaScript, "while (true) {}", &cancel);
    assert!(spin.outcome().timed_out && !spin.outcome().context_restarted, "{spin:?}");
    assert_eq!(spin.errors().len(), 1, "{:?}", spin.errors());
    let cancel = CancelToken::with_timeout(Some(Duration::from_millis(300)));
    let wait = run_with(&f.contexts, "n", Language::JavaScript, "await new Promise(() => {})", &cancel);
    assert!(wait.outcome().timed_out && !wait.outcome().context_restarted, "{wait:?}");
    assert_eq!(js("n + r").value().as_deref(), Some("82"));
}

#[test]
fn bash_exit_status_variables_and_cwd_persist() {
    let f = fixture();
    let sh = |code: &str| run(&f, "b", Language::Bash, code);
    let a = sh("mkdir -p sub && cd sub && GREETING=hello; greet() { echo \"$GREETING $1\"; }");
    a.assert_clean();
    assert_eq!(a.outcome().exit_code, Some(0));
    let b = sh("greet world; pwd; false");
    assert_eq!(b.stdout(), format!("hello world\n{}\n", f.work.path().join("sub").display()));
    assert_eq!(b.outcome().exit_code, Some(1));
    let c = sh("declare -a arr=(x y z); echo ${#arr[@]}; (exit 7)");
    assert_eq!(c.stdout(), "3\n");
    assert_eq!(c.outcome().exit_code, Some(7));
    assert_eq!(sh("echo ${arr[2]}").stdout(), "z\n");
    // stdin is empty, not the driver's channel.
    assert_eq!(sh("cat; read -r line; echo \"[$line]\"").stdout(), "[]\n");
    // A timeout interrupts the foreground command and keeps the shell.
    let cancel = CancelToken::with_timeout(Some(Duration::from_millis(300)));
    let slow = run_with(&f.contexts, "b", Language::Bash, "while true; do sleep 1; done; echo never", &cancel);
    assert!(slow.outcome().timed_out && !slow.outcome().context_restarted, "{slow:?}");
    assert!(!slow.stdout().contains("never"));
    assert_eq!(sh("echo $GREETING").stdout(), "hello\n");
    // `exit` ends the shell: the context restarts and says so.
    let bye = sh("exit 5");
    assert!(bye.outcome().context_restarted);
    assert_eq!(bye.outcome().exit_code, Some(5));
    let fresh = sh("echo \"[$GREETING]\"; pwd");
    assert_eq!(fresh.stdout(), format!("[]\n{}\n", f.work.path().display()));
    let nul = run(&f, "b", Language::Bash, "echo a\0b").outcome.expect_err("NUL accepted");
    assert_eq!(nul.kind, ErrorKind::InvalidArgument);
}

#[test]
fn python_warm_cell_is_fast() {
    let f = fixture();
    py(&f, "fast", "1+1").assert_clean();
    let rounds = 200;
    let start = Instant::now();
    for _ in 0..rounds {
        assert_eq!(py(&f, "fast", "1+1").value().as_deref(), Some("2"));
    }
    let per_cell = start.elapsed() / rounds;
    eprintln!("warm python run_code \"1+1\": {per_cell:?} per cell over {rounds} cells");
    assert!(per_cell < Duration::from_millis(5), "warm cell took {per_cell:?}");
}

#[test]
fn a_queued_cell_is_bounded_by_its_own_deadline() {
    let f = fixture();
    py(&f, "q", "ran = []").assert_clean();
    let contexts = Arc::new(f.contexts);
    let c = contexts.clone();
    let long = std::thread::spawn(move || {
        let cancel = CancelToken::with_timeout(Some(Duration::from_secs(30)));
        run_with(&c, "q", Language::Python, "import time\ntime.sleep(1)\nran.append('long')", &cancel)
    });
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    let cancel = CancelToken::with_timeout(Some(Duration::from_millis(200)));
    let queued = run_with(&contexts, "q", Language::Python, "ran.append('queued')", &cancel);
    assert!(start.elapsed() < Duration::from_millis(700), "queued cell waited {:?}", start.elapsed());
    assert!(queued.outcome().timed_out);
    assert!(queued.errors()[0].value.contains("did not run"), "{:?}", queued.errors());
    long.join().expect("thread").assert_clean();
    let cancel = CancelToken::with_timeout(Some(Duration::from_secs(30)));
    let ran = run_with(&contexts, "q", Language::Python, "ran", &cancel);
    assert_eq!(ran.value().as_deref(), Some("['long']"));
}

#[test]
fn removing_a_context_stops_its_running_cell() {
    let f = fixture();
    let contexts = Arc::new(f.contexts);
    let cancel = CancelToken::with_timeout(Some(Duration::from_secs(30)));
    run_with(&contexts, "gone", Language::Bash, "X=1", &cancel).assert_clean();
    let c = contexts.clone();
    let running = std::thread::spawn(move || {
        let cancel = CancelToken::with_timeout(Some(Duration::from_secs(30)));
        run_with(&c, "gone", Language::Bash, "sleep 20", &cancel)
    });
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    contexts.remove("gone").expect("remove");
    let r = running.join().expect("thread");
    assert!(start.elapsed() < Duration::from_secs(2), "remove took {:?}", start.elapsed());
    assert_eq!(r.outcome.expect_err("cell of a removed context").kind, ErrorKind::NotFound);
    assert!(contexts.list().is_empty());
}

#[test]
fn a_missing_interpreter_is_a_clear_error() {
    let state = tempfile::tempdir().expect("state dir");
    let contexts = Contexts::new(ContextsConfig {
        work_dir: std::env::temp_dir(),
        state_dir: state.path().to_path_buf(),
        python: "/nonexistent/python3".into(),
        ..ContextsConfig::default()
    });
    let r = run_with(&contexts, "p", Language::Python, "1", &CancelToken::new());
    let e = r.outcome.expect_err("started a missing interpreter");
    assert!(e.message.contains("/nonexistent/python3"), "{}", e.message);
    assert!(contexts.list().is_empty(), "a context that never started was kept");
}

#[test]
fn interrupting_a_python_cell_spares_its_background_processes() {
    let f = fixture();
    py(&f, "bg", "import subprocess\nserver = subprocess.Popen(['sleep', '30'])").assert_clean();
    let cancel = CancelToken::with_timeout(Some(Duration::from_millis(300)));
    let r = run_with(&f.contexts, "bg", Language::Python, "subprocess.run(['sleep', '30'])", &cancel);
    assert!(r.outcome().timed_out && !r.outcome().context_restarted, "{r:?}");
    assert_eq!(r.errors()[0].name, "KeyboardInterrupt");
    assert_eq!(py(&f, "bg", "server.poll()").value(), None, "the background process was killed");
    py(&f, "bg", "server.kill(); server.wait()").assert_clean();
}
