//! Admission under races: concurrent resumes (and creates) never together pass the memory
//! budget; exactly as many win as fit, and the others are told the budget.

mod common;

use std::sync::Arc;

use capsule::sandbox::{CreateRequest, ManagerError, Owner};
use common::{open_manager, Settings};

#[tokio::test]
async fn concurrent_resumes_never_overshoot_the_memory_budget() {
    let mut settings = Settings::default();
    settings.limits.memory_budget_mib = 1024;
    let dir = tempfile::Builder::new().prefix("capsule-adm").tempdir_in("/tmp").unwrap();
    let manager = open_manager(dir.path(), &settings);
    let owner = Owner::new("racer");
    let make = |m: &capsule::sandbox::Manager| {
        let (m, owner) = (m.clone(), owner.clone());
        async move { m.create(&owner, CreateRequest { memory_mib: Some(256), ..Default::default() }).await.unwrap() }
    };
    // Eight paused sandboxes of 256 MiB, and one running: 768 MiB of the budget are left, room
    // for three more to run.
    let mut paused = Vec::new();
    for _ in 0..8 {
        let record = make(&manager).await;
        manager.pause(&owner, Some(&record.id)).await.unwrap();
        paused.push(record.id);
    }
    let _running = make(&manager).await;

    let barrier = Arc::new(tokio::sync::Barrier::new(paused.len()));
    let tasks: Vec<_> = paused
        .iter()
        .map(|id| {
            let (m, owner, id, barrier) = (manager.clone(), owner.clone(), id.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                m.resume(&owner, Some(&id)).await
            })
        })
        .collect();
    let mut won = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => won += 1,
            Err(ManagerError::Limit(e)) => assert!(e.to_string().contains("memory budget"), "{e}"),
            Err(other) => panic!("a resume failed for another reason: {other}"),
        }
    }
    assert_eq!(won, 3, "exactly as many resumes win as fit in the budget");
    let (records, _) = manager.list(&owner);
    let running_mib: u32 = records.iter().filter(|r| r.holds_memory()).map(|r| r.memory_mib).sum();
    assert!(running_mib <= 1024, "{running_mib} MiB running over a 1024 MiB budget");
    manager.kill_all().await;
}
