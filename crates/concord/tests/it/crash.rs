use crate::harness::*;
use concord_core::api::Role;
use serde_json::json;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let mut hub = Hub::start();
    let admin = hub.admin();
    let (p, ps) = register(&admin, reg("durable", Role::Primary, Some("main"))).await;
    let fence = p.fence.unwrap();
    let acked_regs = Arc::new(Mutex::new(Vec::<String>::new()));
    let acked_state = Arc::new(Mutex::new(Vec::<(String, i64)>::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let (admin, ps) = (admin.clone(), ps.clone());
        let (regs, states) = (acked_regs.clone(), acked_state.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                if w % 2 == 0 {
                    match admin
                        .register(&reg("durable", Role::Secondary, Some(&format!("w{w}-{i}"))))
                        .await
                    {
                        Ok(r) => regs.lock().unwrap().push(r.instance.id),
                        Err(_) => break,
                    }
                } else {
                    let key = format!("k{w}-{i}");
                    match ps
                        .put_state("durable", &key, json!(i), Some(fence), None)
                        .await
                    {
                        Ok(e) => states.lock().unwrap().push((key, e.revision)),
                        Err(_) => break,
                    }
                }
            }
        }));
    }
    // Let the load run until a good number of writes were acknowledged.
    eventually(Duration::from_secs(30), "some acknowledged writes", || {
        let (r, s) = (acked_regs.clone(), acked_state.clone());
        async move { (r.lock().unwrap().len() > 200 && s.lock().unwrap().len() > 200).then_some(()) }
    })
    .await;
    hub.kill9();
    for w in writers {
        w.await.unwrap();
    }
    hub.spawn();
    let admin = hub.admin();
    let all: std::collections::HashSet<String> = admin
        .list_instances(Some("durable"), None, Some("all"))
        .await
        .unwrap()
        .instances
        .into_iter()
        .map(|i| i.id)
        .collect();
    let regs = acked_regs.lock().unwrap().clone();
    let missing: Vec<_> = regs.iter().filter(|id| !all.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged registrations lost",
        missing.len()
    );
    let state = admin.list_state("durable").await.unwrap().entries;
    let states = acked_state.lock().unwrap().clone();
    for (key, rev) in &states {
        let e = state
            .iter()
            .find(|e| &e.key == key)
            .unwrap_or_else(|| panic!("acknowledged state {key} lost"));
        assert!(e.revision >= *rev);
    }
    // The primary grant survived too: same epoch, same holder.
    let e = admin.entity("durable").await.unwrap();
    assert_eq!(e.epoch, fence);
    eprintln!(
        "kill -9: {} registrations and {} state writes acknowledged, 0 lost",
        regs.len(),
        states.len()
    );
}

#[tokio::test]
async fn a_second_hub_on_the_same_data_dir_refuses_to_start() {
    let hub = Hub::start();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&hub.dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
    // The first hub is unharmed.
    hub.admin().status().await.unwrap();
}

#[tokio::test]
async fn admin_token_file_is_private_and_sigterm_stops_cleanly() {
    use std::os::unix::fs::PermissionsExt;
    let mut hub = Hub::start();
    let mode = std::fs::metadata(hub.dir.join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let pid = hub.pid();
    unsafe_kill(pid, 15);
    let mut child = hub.child.take().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "hub exit status after SIGTERM: {status}");
    // A restart keeps the same admin token and data.
    let before = hub.admin.clone();
    hub.spawn();
    assert_eq!(hub.admin, before);
    hub.admin().status().await.unwrap();
}

fn unsafe_kill(pid: u32, sig: i32) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}
