//! The KVM engine on real KVM with the built guest image: a machine boots, runs commands,
//! pauses to disk (its worker ends), resumes from the snapshot with its processes, files and
//! Python state intact, forks into children with their own copy of memory and disk (and
//! reseeded RNGs), and is killed. Sandboxes start from a warmed template: the default Python
//! context has numpy, pandas and matplotlib imported. Pause, resume and restore-to-first-reply
//! times are printed (`-- --nocapture`).
//!
//! Skips only when /dev/kvm is unusable or no image is built (`capsule image build`).

#[path = "common/kvm.rs"]
mod kvm;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use capsule::engine::kvm::{KvmEngine, MAX_INCREMENTAL_LAYERS};
use capsule::engine::{Engine, ErrorKind};
use kvm::{assert_ticking, engine, engine_in_tempdir, lines_of, py, py_in, sh, spawn, spec, ticker};

/// Milliseconds, for the printed measurements.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    ms(samples[samples.len() / 2])
}

/// How many processes named `sleep` the guest has.
const COUNT_SLEEPERS: &str = "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep";

fn worker_pids_of(dir: &std::path::Path) -> usize {
    // Our worker processes have the sandbox's serial log open; count those that do.
    let needle = dir.join("serial.log");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read_dir(e.path().join("fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p == needle))
        })
        .count()
}

#[test]
fn a_machine_runs_pauses_to_disk_resumes_and_is_killed() {
    let Some((root, engine)) = engine_in_tempdir() else {
        return;
    };
    let mut machine = engine.create(&spec("kvm-a")).expect("create");
    let dir = root.path().join("kvm-a");
    let client = machine.connect().expect("connect");
    // The agent (PID 1 and the server it forks) is the OOM killer's last choice; what it runs is
    // not (it resets its own score).
    assert_eq!(sh(&client, "cat /proc/1/oom_score_adj /proc/self/oom_score_adj"), "-1000\n0\n");
    // A background process and a file, both of which must survive the pause.
    sh(&client, "echo before > /root/marker");
    spawn(&client, "sleep 1000");
    assert_eq!(sh(&client, COUNT_SLEEPERS).trim(), "1");
    assert_eq!(worker_pids_of(&dir), 1, "one worker runs the VM");

    let t = Instant::now();
    machine.pause().expect("pause");
    let paused_in = t.elapsed();
    assert!(client.closed_reason().is_some(), "pausing drops the agent connection");
    assert_eq!(worker_pids_of(&dir), 0, "a paused machine has no worker (RAM freed)");
    assert_eq!(machine.saved_state()["snapshot_generation"], 1);
    assert_eq!(machine.saved_state()["chain_layers"], 1, "the first pause is a layer over the template");
    machine.check_alive().expect("a machine paused to disk is alive");

    let t = Instant::now();
    machine.resume().expect("resume");
    let client = machine.connect().expect("reconnect after resume");
    eprintln!("kvm engine: pause to disk {paused_in:?}, resume + reconnect {:?}", t.elapsed());
    assert_eq!(sh(&client, "cat /root/marker"), "before\n");
    assert_eq!(sh(&client, COUNT_SLEEPERS).trim(), "1", "processes survive");
    // The host set the clock after the restore: the guest's time is the host's, within a minute.
    let guest_now: u64 = sh(&client, "date +%s").trim().parse().unwrap();
    let host_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(guest_now.abs_diff(host_now) < 60, "guest {guest_now} host {host_now}");

    // Paused twice: the second snapshot is a layer over the first, which stays (its parent).
    machine.pause().expect("pause again");
    assert_eq!(machine.saved_state()["snapshot_generation"], 2);
    assert_eq!(machine.saved_state()["chain_layers"], 2);
    assert!(dir.join("snapshot-1").exists(), "the parent of the newest snapshot is kept");
    assert!(dir.join("snapshot-origin").exists(), "the base of the chain is kept");
    machine.resume().expect("resume again");
    assert_eq!(sh(&machine.connect().unwrap(), "echo again"), "again\n");

    machine.kill().expect("kill");
    assert!(!dir.exists(), "kill deletes the sandbox directory");
    assert_eq!(worker_pids_of(&dir), 0);
    machine.kill().expect("kill is idempotent");
}

#[test]
fn a_fork_copies_memory_processes_and_disk_and_then_diverges() {
    let Some((_root, engine)) = engine_in_tempdir() else {
        return;
    };
    let mut parent = engine.create(&spec("kvm-parent")).expect("create");
    let client = parent.connect().expect("connect");
    sh(&client, "echo parent-file > /root/shared");
    spawn(&client, "sleep 1000");
    let parent_boot_id = sh(&client, "cat /proc/sys/kernel/random/boot_id");

    let t = Instant::now();
    let mut child = parent.fork(&spec("kvm-child")).expect("fork");
    let child_client = child.connect().expect("connect to the child");
    eprintln!("kvm engine: fork + connect {:?}", t.elapsed());
    assert_eq!(sh(&child_client, "cat /root/shared"), "parent-file\n");
    assert_eq!(sh(&child_client, COUNT_SLEEPERS).trim(), "1", "the child has the parent's processes");
    // Same boot (memory copied), different futures: writes do not cross.
    assert_eq!(sh(&child_client, "cat /proc/sys/kernel/random/boot_id"), parent_boot_id);
    sh(&child_client, "echo child > /root/shared");
    let parent_client = parent.connect().expect("the parent runs on after the fork");
    assert_eq!(sh(&parent_client, "cat /root/shared"), "parent-file\n");
    assert_eq!(sh(&child_client, "cat /root/shared"), "child\n");
    // Fresh entropy: the two RNGs differ.
    let a = sh(&parent_client, "head -c 16 /dev/urandom | od -An -tx1");
    let b = sh(&child_client, "head -c 16 /dev/urandom | od -An -tx1");
    assert_ne!(a, b);

    child.kill().expect("kill the child");
    parent.kill().expect("kill the parent");
}

#[test]
fn more_vcpus_than_a_pvm_host_allows_is_a_clear_error() {
    if !capsule_vmm::host::is_pvm() {
        eprintln!("SKIP: this host's KVM is not PVM; the limit only applies there");
        return;
    }
    let Some((root, engine)) = engine_in_tempdir() else {
        return;
    };
    let mut two = spec("kvm-two");
    two.vcpus = 2;
    let Err(err) = engine.create(&two) else { panic!("2 vCPUs must be refused on PVM") };
    assert_eq!(err.kind(), ErrorKind::Limit, "{err}");
    let text = err.to_string();
    assert!(text.contains("PVM") && text.contains("at most 1 vCPU"), "{text}");
    assert!(!root.path().join("kvm-two").exists(), "nothing is left behind");
}

#[test]
fn a_paused_machine_is_found_again_by_a_new_engine_after_a_restart() {
    let Some((root, engine)) = engine_in_tempdir() else {
        return;
    };
    let mut machine = engine.create(&spec("kvm-r")).expect("create");
    sh(&machine.connect().unwrap(), "echo kept > /root/kept");
    machine.pause().expect("pause");
    let saved = machine.saved_state();
    // The server goes away: its machines are dropped (their workers were already stopped).
    drop(machine);
    drop(engine);

    let engine = self::engine(root.path().to_path_buf()).expect("engine again");
    let mut machine = engine.reattach(&spec("kvm-r"), &saved, true).expect("reattach").machine;
    machine.check_alive().expect("paused to disk counts as alive");
    machine.resume().expect("resume from the saved snapshot");
    assert_eq!(sh(&machine.connect().unwrap(), "cat /root/kept"), "kept\n");
    machine.kill().expect("kill");
}

#[test]
fn sandboxes_of_one_size_restore_one_template_and_stay_independent() {
    let Some((root, engine)) = engine_in_tempdir() else {
        return;
    };
    let t = Instant::now();
    let mut first = engine.create(&spec("kvm-t1")).expect("create the first");
    let first_in = t.elapsed();
    let t = Instant::now();
    let mut second = engine.create(&spec("kvm-t2")).expect("create the second");
    let second_in = t.elapsed();
    eprintln!("kvm engine: create with template build {first_in:?}, create from template {second_in:?}");

    let templates: Vec<_> =
        std::fs::read_dir(root.path().join(".templates")).expect("templates dir").flatten().collect();
    assert_eq!(templates.len(), 1, "one template for one size: {templates:?}");
    // Neither booted: their consoles never saw the agent start (the template's did).
    for id in ["kvm-t1", "kvm-t2"] {
        let console = std::fs::read_to_string(root.path().join(id).join("serial.log")).unwrap_or_default();
        assert!(!console.contains("capsule-agent: init ok"), "{id} booted:\n{console}");
    }
    let template_console = std::fs::read_to_string(templates[0].path().join("serial.log")).unwrap();
    assert!(template_console.contains("capsule-agent ready"), "{template_console}");
    // Their own files and RNG.
    let (a, b) = (first.connect().unwrap(), second.connect().unwrap());
    sh(&a, "echo first > /root/who");
    sh(&b, "echo second > /root/who");
    assert_eq!(sh(&a, "cat /root/who"), "first\n");
    assert_eq!(sh(&b, "cat /root/who"), "second\n");
    let random = "head -c 16 /dev/urandom | od -An -tx1";
    assert_ne!(sh(&a, random), sh(&b, random));

    first.kill().expect("kill");
    second.kill().expect("kill");
    assert!(root.path().join(".templates").read_dir().unwrap().count() == 1, "killing sandboxes keeps the template");
}

#[test]
fn python_state_and_a_background_process_survive_pause_and_resume() {
    let Some((_root, engine)) = engine_in_tempdir() else {
        return;
    };
    // The first create builds (and warms) the template; the measured one restores it.
    engine.create(&spec("kvm-w0")).expect("build the template").kill().expect("kill");
    let t = Instant::now();
    let mut machine = engine.create(&spec("kvm-w")).expect("create");
    let client = machine.connect().expect("connect");
    sh(&client, "true");
    let create_to_reply = t.elapsed();

    // Warm template: the default context has pandas imported already; a new context does not
    // (that is what the first `run_code` cost before templates were warmed).
    let t = Instant::now();
    py(&client, "import pandas");
    let warm_import = t.elapsed();
    let t = Instant::now();
    py_in(&client, "cold", "import pandas");
    let cold_import = t.elapsed();
    eprintln!(
        "kvm engine: create (template restore) to first agent reply {:.1} ms; first `import pandas` \
         in a new sandbox: warm default context {:.1} ms, cold context {:.1} ms",
        ms(create_to_reply),
        ms(warm_import),
        ms(cold_import)
    );
    assert!(
        warm_import < Duration::from_secs(1) && warm_import < cold_import,
        "the template's python context has pandas imported: warm {warm_import:?}, cold {cold_import:?}"
    );

    py(&client, "x = 41");
    let pid = spawn(&client, &ticker("/root/ticks"));
    assert_ticking(&client, pid, "/root/ticks");

    let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        machine.pause().expect("pause");
        pauses.push(t.elapsed());
        let t = Instant::now();
        machine.resume().expect("resume");
        let client = machine.connect().expect("reconnect after resume");
        sh(&client, "true");
        resumes.push(t.elapsed());
        assert_eq!(py(&client, "x + 1"), "42", "the Python context kept x");
        assert_ticking(&client, pid, "/root/ticks");
    }
    eprintln!(
        "kvm engine (warmed sandbox, 512 MiB): pause to disk median {:.1} ms {pauses:?}; \
         resume (restore) to first agent reply median {:.1} ms {resumes:?}",
        median_ms(pauses.clone()),
        median_ms(resumes.clone())
    );
    machine.kill().expect("kill");
}

/// Parent plus `FORKS` children, each with `x = 41` from the parent; returns them all.
const FORKS: usize = 10;

fn parent_and_forks(
    engine: &KvmEngine,
    prefix: &str,
) -> (Box<dyn capsule::engine::Machine>, Vec<Box<dyn capsule::engine::Machine>>) {
    let mut parent = engine.create(&spec(&format!("{prefix}-p"))).expect("create");
    let client = parent.connect().expect("connect");
    py(&client, "import os\nx = 41");
    sh(&client, "echo parent > /root/who");
    let mut took = Vec::new();
    let children: Vec<_> = (0..FORKS)
        .map(|i| {
            let t = Instant::now();
            let child = parent.fork(&spec(&format!("{prefix}-{i}"))).unwrap_or_else(|e| panic!("fork {i}: {e}"));
            took.push(t.elapsed());
            child
        })
        .collect();
    eprintln!("kvm engine: fork median {:.1} ms over {FORKS} forks", median_ms(took));
    (parent, children)
}

#[test]
fn ten_forks_start_from_the_parents_state_and_then_diverge() {
    let Some((root, engine)) = engine_in_tempdir() else {
        return;
    };
    let (mut parent, mut children) = parent_and_forks(&engine, "kvm-d");
    // Forks share memory files with their parent and the template: ten of them take less disk
    // than one full snapshot of the template.
    let template_base = std::fs::read_dir(root.path().join(".templates"))
        .unwrap()
        .flatten()
        .map(|entry| allocated_bytes(&entry.path().join("snapshot-0/memory.bin")))
        .sum::<u64>();
    let sandboxes = allocated_bytes_outside_templates(root.path());
    eprintln!(
        "kvm engine: parent and {FORKS} forks take {} MiB on disk beyond the template's {} MiB",
        sandboxes >> 20,
        template_base >> 20
    );
    assert!(sandboxes < template_base, "{FORKS} forks take {sandboxes} bytes on disk, the template {template_base}");
    for (i, child) in children.iter_mut().enumerate() {
        let c = child.connect().expect("connect to a child");
        assert_eq!(py(&c, "x"), "41", "child {i} sees the parent's variable");
        assert_eq!(sh(&c, "cat /root/who"), "parent\n", "child {i} has the parent's files");
        py(&c, &format!("x = {}", 100 + i));
        sh(&c, &format!("echo child-{i} > /root/who"));
    }
    let p = parent.connect().expect("the parent runs on");
    assert_eq!(py(&p, "x"), "41", "children's writes do not reach the parent");
    assert_eq!(sh(&p, "cat /root/who"), "parent\n");
    for (i, child) in children.iter_mut().enumerate() {
        let c = child.connect().expect("connect to a child");
        assert_eq!(py(&c, "x"), (100 + i).to_string(), "child {i} kept its own value");
        assert_eq!(sh(&c, "cat /root/who"), format!("child-{i}\n"));
        child.kill().expect("kill a child");
    }
    parent.kill().expect("kill the parent");
}

#[test]
fn every_fork_has_its_own_random_numbers() {
    let Some((_root, engine)) = engine_in_tempdir() else {
        return;
    };
    let (mut parent, mut children) = parent_and_forks(&engine, "kvm-r");
    let mut kernel = std::collections::BTreeSet::new();
    let mut python = std::collections::BTreeSet::new();
    for machine in std::iter::once(&mut parent).chain(children.iter_mut()) {
        let c = machine.connect().expect("connect");
        kernel.insert(sh(&c, "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"));
        python.insert(py(&c, "os.urandom(16).hex()"));
    }
    assert_eq!(kernel.len(), FORKS + 1, "/dev/urandom repeats across forks: {kernel:?}");
    assert_eq!(python.len(), FORKS + 1, "os.urandom repeats across forks: {python:?}");
    for child in &mut children {
        child.kill().expect("kill a child");
    }
    parent.kill().expect("kill the parent");
}

/// Bytes on disk of the files under `root` that are not also files of the templates (each
/// inode counted once).
fn allocated_bytes_outside_templates(root: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &std::path::Path, inodes: &mut std::collections::BTreeMap<u64, u64>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                walk(&entry.path(), inodes);
            } else {
                inodes.insert(meta.ino(), meta.blocks() * 512);
            }
        }
    }
    let (mut all, mut templates) = (Default::default(), Default::default());
    walk(root, &mut all);
    walk(&root.join(".templates"), &mut templates);
    all.iter().filter(|(ino, _)| !templates.contains_key(ino)).map(|(_, bytes)| bytes).sum()
}

/// The inode of the file at `path`.
fn inode_of(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).ino()
}

/// How many names the file at `path` has.
fn links_of(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).nlink()
}

/// Bytes the file at `path` takes on disk (holes of a sparse layer take none).
fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).blocks() * 512
}

/// The `snapshot-*` directories in the sandbox directory `dir` (`snapshot-N`, and
/// `snapshot-origin`, the linked copy of the chain it was restored from when it was made).
fn snapshots_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("snapshot-"))
        .collect();
    names.sort();
    names
}

/// Pauses `machine` and returns how long that took, its snapshot generation and chain layers.
fn timed_pause(machine: &mut Box<dyn capsule::engine::Machine>) -> (Duration, u64, u64) {
    let t = Instant::now();
    machine.pause().expect("pause");
    let took = t.elapsed();
    let saved = machine.saved_state();
    let generation = saved["snapshot_generation"].as_u64().expect("a generation");
    let layers = saved["chain_layers"].as_u64().expect("chain layers");
    (took, generation, layers)
}

/// Resumes `machine` and checks its Python counter is `x` and its file holds `lines` lines;
/// then adds one to both.
fn resume_check_and_advance(machine: &mut Box<dyn capsule::engine::Machine>, x: u64, lines: u64) {
    machine.resume().expect("resume");
    let client = machine.connect().expect("reconnect after resume");
    assert_eq!(py(&client, "x"), x.to_string(), "the Python context kept x");
    assert_eq!(lines_of(&client, "/root/log"), lines, "the file kept its lines");
    py(&client, "x += 1");
    sh(&client, "echo more >> /root/log");
}

#[test]
fn later_pauses_write_incremental_layers_that_resume_and_survive_a_restart() {
    let Some((root, engine)) = engine_in_tempdir() else {
        return;
    };
    let mut machine = engine.create(&spec("kvm-i")).expect("create");
    let dir = root.path().join("kvm-i");
    let client = machine.connect().expect("connect");
    py(&client, "x = 0");
    sh(&client, "echo start > /root/log");

    // The chain's full base is the template's snapshot, shared by a hard link, not copied.
    let base = dir.join("snapshot-origin/0/memory.bin");
    let full_bytes = allocated_bytes(&base);
    assert!(links_of(&base) >= 2, "the template's memory is linked into the sandbox, not copied");
    let mut layered = Vec::new();
    for round in 0..5u64 {
        let (took, generation, layers) = timed_pause(&mut machine);
        assert_eq!(generation, round + 1);
        let memory = allocated_bytes(&dir.join(format!("snapshot-{generation}/memory.bin")));
        // Restored from a linked copy of the template: even the first pause is a layer.
        assert_eq!(layers, round + 1, "pause {round} stacks a layer");
        assert!(memory * 8 < full_bytes, "layer {round} takes {memory} bytes on disk, the full base {full_bytes}");
        layered.push(took);
        assert_eq!(
            snapshots_in(&dir).len() as u64,
            generation + 1,
            "the whole chain is kept: {:?}",
            snapshots_in(&dir)
        );
        resume_check_and_advance(&mut machine, round, round + 1);
    }

    // Paused in a layer, the server restarts: the chain's head is enough to come back.
    let (_, generation, layers) = timed_pause(&mut machine);
    assert_eq!((generation, layers), (6, 6));
    let saved = machine.saved_state();
    drop(machine);
    drop(engine);
    let engine = self::engine(root.path().to_path_buf()).expect("engine again");
    let mut machine = engine.reattach(&spec("kvm-i"), &saved, true).expect("reattach").machine;
    resume_check_and_advance(&mut machine, 5, 6);
    // The reattached sandbox keeps stacking layers on the same chain.
    let (_, generation, layers) = timed_pause(&mut machine);
    assert_eq!((generation, layers), (7, 7));
    resume_check_and_advance(&mut machine, 6, 7);

    // Chains are bounded: once the newest snapshot has MAX_INCREMENTAL_LAYERS layers the next
    // pause is full, and the old chain goes.
    let (mut x, mut generation) = (7u64, 7u64);
    for layers in 8..=MAX_INCREMENTAL_LAYERS as u64 {
        generation += 1;
        let (_, now, now_layers) = timed_pause(&mut machine);
        assert_eq!((now, now_layers), (generation, layers));
        resume_check_and_advance(&mut machine, x, x + 1);
        x += 1;
    }
    let (full, last, layers) = timed_pause(&mut machine);
    assert_eq!((last, layers), (generation + 1, 0), "past the bound the pause is full");
    assert_eq!(snapshots_in(&dir), vec![format!("snapshot-{last}")], "a full pause deletes the older chain");
    eprintln!(
        "kvm engine (warmed sandbox, 512 MiB): incremental pause median {:.1} ms {layered:?}; full pause \
         {:.1} ms ({} MiB on disk)",
        median_ms(layered.clone()),
        full.as_secs_f64() * 1000.0,
        allocated_bytes(&dir.join(format!("snapshot-{last}/memory.bin"))) >> 20
    );
    resume_check_and_advance(&mut machine, x, x + 1);

    machine.kill().expect("kill");
    assert!(!dir.exists(), "kill deletes the sandbox and its whole chain");
}

#[test]
fn forks_share_their_parents_chain_by_links_and_outlive_it() {
    let Some((root, engine)) = engine_in_tempdir() else {
        return;
    };
    let mut parent = engine.create(&spec("kvm-cp")).expect("create");
    let dir = root.path().join("kvm-cp");
    let client = parent.connect().expect("connect");
    py(&client, "x = 0");
    sh(&client, "echo start > /root/log");
    assert_eq!(timed_pause(&mut parent).2, 1, "first pause: a layer over the template");
    resume_check_and_advance(&mut parent, 0, 1);
    assert_eq!(timed_pause(&mut parent).2, 2, "second pause: another layer");

    // Forked while paused in a layer: the child restores a linked copy of the parent's chain.
    let mut on_disk_child = parent.fork(&spec("kvm-c1")).expect("fork from disk");
    resume_check_and_advance(&mut parent, 1, 2);
    // Forked while running: the parent writes its next layer, the child links its chain.
    let mut running_child = parent.fork(&spec("kvm-c2")).expect("fork while running");
    let parent_layer = dir.join("snapshot-3/memory.bin");
    let child_layer = root.path().join("kvm-c2/snapshot-origin/3/memory.bin");
    assert_eq!(inode_of(&parent_layer), inode_of(&child_layer), "the fork's memory is shared, not copied");
    let (_, generation, layers) = timed_pause(&mut parent);
    assert_eq!((generation, layers), (4, 4), "the parent's chain goes on after a fork");
    assert_eq!(
        snapshots_in(&dir),
        ["snapshot-1", "snapshot-2", "snapshot-3", "snapshot-4", "snapshot-origin"].map(String::from).to_vec()
    );
    parent.kill().expect("kill the parent");
    assert!(!dir.exists());

    // The children do not depend on the parent's files.
    let client = on_disk_child.connect().expect("connect the on-disk child");
    assert_eq!(py(&client, "x"), "1");
    let (_, _, layers) = timed_pause(&mut on_disk_child);
    assert_eq!(layers, 3, "a child layers over its copy of its parent's chain");
    resume_check_and_advance(&mut on_disk_child, 1, 2);

    let client = running_child.connect().expect("connect the running child");
    assert_eq!(py(&client, "x"), "2");
    let (_, _, layers) = timed_pause(&mut running_child);
    assert_eq!(layers, 4, "a child layers over its copy of its parent's chain");
    resume_check_and_advance(&mut running_child, 2, 3);

    on_disk_child.kill().expect("kill");
    running_child.kill().expect("kill");
}

#[test]
fn a_paused_sandbox_resumes_and_forks_after_the_image_cache_dropped_its_root_filesystem() {
    let Some((root, engine)) = engine_in_tempdir() else {
        return;
    };
    let mut image = engine.image().clone();
    drop(engine);
    // The root filesystem of an image the cache is about to drop: another name for the current one.
    let dropped = root.path().join("evicted-rootfs.ext4");
    if let Err(e) = std::fs::hard_link(&image.rootfs, &dropped) {
        eprintln!("SKIP: the image cache is on another filesystem than the temporary directory: {e}");
        return;
    }
    image.rootfs = dropped.clone();
    let engine = KvmEngine::new(
        PathBuf::from(env!("CARGO_BIN_EXE_capsule")),
        image,
        root.path().to_path_buf(),
        capsule::daemon::open::default_warm_up(),
    )
    .expect("engine");
    let mut machine = engine.create(&spec("kvm-rootfs")).expect("create");
    sh(&machine.connect().expect("connect"), "echo kept > /root/marker");
    machine.pause().expect("pause");
    std::fs::remove_file(&dropped).expect("drop the image's root filesystem");

    machine.resume().expect("resume without the image cache's file");
    let client = machine.connect().expect("reconnect");
    assert_eq!(sh(&client, "cat /root/marker"), "kept\n");
    assert_eq!(py(&client, "import json; json.dumps([1])"), "'[1]'", "the root filesystem is readable");
    let mut child = machine.fork(&spec("kvm-rootfs-child")).expect("fork");
    assert_eq!(sh(&child.connect().expect("connect the child"), "cat /root/marker"), "kept\n");
    child.kill().expect("kill the child");
    machine.kill().expect("kill");
}

#[test]
fn forking_several_at_once_takes_the_parents_state_once() {
    let Some((root, engine)) = engine_in_tempdir() else {
        return;
    };
    let mut parent = engine.create(&spec("kvm-m")).expect("create");
    py(&parent.connect().expect("connect"), "x = 7");
    let specs: Vec<_> = (0..3).map(|i| spec(&format!("kvm-m-{i}"))).collect();
    let mut children: Vec<_> = parent.fork_many(&specs).into_iter().map(|made| made.expect("fork")).collect();
    // One snapshot of the parent, its generation 1 (a layer over the template), shared by all.
    let layer = root.path().join("kvm-m/snapshot-1/memory.bin");
    assert!(!root.path().join("kvm-m/snapshot-2").exists(), "the parent's state was taken once");
    for (i, child) in children.iter_mut().enumerate() {
        let top = root.path().join(format!("kvm-m-{i}/snapshot-origin/1/memory.bin"));
        assert_eq!(inode_of(&top), inode_of(&layer), "child {i} starts from the one snapshot");
        let c = child.connect().expect("connect to a child");
        assert_eq!(py(&c, "x"), "7");
        py(&c, &format!("x = {i}"));
    }
    for (i, child) in children.iter_mut().enumerate() {
        assert_eq!(py(&child.connect().expect("connect"), "x"), i.to_string(), "child {i} diverged on its own");
        child.kill().expect("kill a child");
    }
    assert_eq!(py(&parent.connect().expect("the parent runs on"), "x"), "7");

    // On PVM a child asking for 2 vCPUs fails alone; the others are made.
    if capsule_vmm::host::is_pvm() {
        let mut two = spec("kvm-m-two");
        two.vcpus = 2;
        let made = parent.fork_many(&[spec("kvm-m-ok"), two]);
        assert_eq!(made.len(), 2);
        let mut made = made.into_iter();
        made.next().unwrap().expect("the 1-vCPU child is made").kill().expect("kill");
        let err = made.next().unwrap().err().expect("2 vCPUs are refused on PVM").to_string();
        assert!(err.contains("at most 1 vCPU"), "{err}");
        assert!(!root.path().join("kvm-m-two").exists(), "nothing is left of the refused child");
    }
    parent.kill().expect("kill the parent");
}

#[test]
fn a_running_machine_outlives_its_engine_and_the_next_engine_attaches_to_it() {
    let Some((root, engine)) = engine_in_tempdir() else {
        return;
    };
    let mut machine = engine.create(&spec("kvm-o")).expect("create");
    let client = machine.connect().expect("connect");
    py(&client, "kept = 'interpreter state'");
    let pid = spawn(&client, &ticker("/root/ticks"));
    assert_ticking(&client, pid, "/root/ticks");
    let before: u64 = sh(&client, "wc -l < /root/ticks").trim().parse().unwrap();
    let saved = machine.saved_state();
    // The server goes away without stopping anything (as `kill -9` of the daemon does).
    machine.release();
    drop(engine);
    std::thread::sleep(Duration::from_secs(2));

    let engine = self::engine(root.path().to_path_buf()).expect("engine again");
    let found = engine.reattach(&spec("kvm-o"), &saved, false).expect("reattach a running machine");
    assert!(found.rolled_back.is_none(), "its worker was still there: {:?}", found.rolled_back);
    let mut machine = found.machine;
    let client = machine.connect().expect("connect to the same guest");
    let after: u64 = sh(&client, "wc -l < /root/ticks").trim().parse().unwrap();
    assert!(after > before, "the background loop ran on while no engine watched: {before} then {after}");
    assert_eq!(py(&client, "kept"), "'interpreter state'");
    // Its next pause is whole, and it resumes from it.
    machine.pause().expect("pause");
    machine.resume().expect("resume");
    assert_eq!(py(&machine.connect().unwrap(), "kept"), "'interpreter state'");
    machine.kill().expect("kill");
}
