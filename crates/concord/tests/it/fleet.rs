//! `concord run`, `concord up` / `down` / `ps` through the real binary: agents are
//! small shell scripts written here, which record what they were given in their
//! home. Each test uses its own port range, so tests running at once never meet.

use crate::harness::*;
use concord_core::api::{Instance, InstanceState};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const WITHIN: Duration = Duration::from_secs(30);

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// An agent that writes its environment and working directory to its home,
/// appends a line per start, and then waits to be stopped.
/// Records what the agent was started with. Each file appears whole (written
/// aside, then renamed) and `starts.txt` gains its line last, so a test that
/// has seen the line can read the others without racing the script.
const RECORDING_AGENT: &str = r#"pwd > pwd.tmp && mv pwd.tmp pwd.txt
env | grep -E '^(CONCORD_|PORT=|MODEL=)' | sort > env.tmp && mv env.tmp env.txt
echo "$PORT" >> starts.txt
exec sleep 600"#;

fn env_file(home: &Path) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(home.join("env.txt")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn alive(pid: i64) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    matches!(
        stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()),
        Some(s) if s != "Z" && s != "X"
    )
}

fn signal(pid: i64, sig: i32) {
    // SAFETY: kill(2) on a process this test started (directly or through concord).
    unsafe { libc::kill(pid as i32, sig) };
}

/// Kills whatever a test started through `concord up` or `concord run` if the
/// test ends early: the supervisors (their children go with them) and the
/// children's process groups, found from the state files.
struct Reaper {
    roots: Vec<PathBuf>,
    runs: Vec<Child>,
}

impl Reaper {
    fn new(root: &Path) -> Reaper {
        Reaper {
            roots: vec![root.to_path_buf()],
            runs: Vec::new(),
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for r in &mut self.runs {
            let _ = r.kill();
            let _ = r.wait();
        }
        for root in &self.roots {
            let Ok(dir) = std::fs::read_dir(root.join(".concord-fleet")) else {
                continue;
            };
            for e in dir.flatten() {
                let v: Value = std::fs::read(e.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or(Value::Null);
                if let Some(pid) = v["supervisor_pid"].as_i64() {
                    signal(pid, libc::SIGKILL);
                }
                if let Some(pid) = v["process"]["pid"].as_i64() {
                    signal(-pid, libc::SIGKILL);
                }
            }
        }
    }
}

fn run_out(hub: &Hub, args: &[&str], cwd: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env("CONCORD_URL", &hub.url)
        .env("CONCORD_TOKEN", &hub.admin)
        .output()
        .expect("run concord")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `concord run` in the background, its output in `log`.
fn spawn_run(hub: &Hub, args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(BIN)
        .arg("run")
        .args(args)
        .env("CONCORD_URL", &hub.url)
        .env("CONCORD_TOKEN", &hub.admin)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn concord run")
}

async fn instances(hub: &Hub, state: &str) -> Vec<Instance> {
    hub.admin()
        .list_instances(None, None, Some(state))
        .await
        .unwrap()
        .instances
}

fn read_json(path: &Path) -> Value {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// Waits for a `concord run` to exit (after a signal), with a deadline.
async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    eventually(WITHIN, "concord run to exit", || {
        let s = child.try_wait().unwrap();
        async move { s }
    })
    .await
}

fn fleet_file(hub: &Hub, range: &str, agents: &str) -> String {
    format!(
        "# a test fleet\nhub = \"{}\"\ntoken_file = \"token\"\nhome_root = \"agents\"\nport_range = \"{range}\"\nttl_ms = 3000\n\n{agents}",
        hub.url
    )
}

const THREE: &str = r#"
[[agent]]
entity = "sisters"
label = "main"
role = "primary"
command = ["./agent.sh"]
capabilities = ["chat"]

[[agent]]
entity = "sisters"
label = "Tab 2"
command = ["./agent.sh", "v1"]
env = { MODEL = "k2" }

[[agent]]
entity = "anvil"
label = "worker"
command = ["./agent.sh"]
restart = "always"

[[schedule]]
name = "fleet-test-nightly"
queue = "review"
every_ms = 60000
payload = { scope = "all" }
"#;

#[tokio::test]
async fn a_fleet_comes_up_isolated_applies_only_the_difference_and_goes_down() {
    let hub = Hub::start();
    let admin = hub.admin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("agents");
    let _reaper = Reaper::new(&root);
    script(dir, "agent.sh", RECORDING_AGENT);
    std::fs::write(dir.join("token"), &hub.admin).unwrap();
    let fleet = dir.join("fleet.toml");
    std::fs::write(&fleet, fleet_file(&hub, "21000-21009", THREE)).unwrap();
    let fleet_s = fleet.to_str().unwrap();

    // `up` from another directory, without CONCORD_URL: the file says it all.
    let out = Command::new(BIN)
        .args(["up", fleet_s, "--json"])
        .env_remove("CONCORD_URL")
        .env_remove("CONCORD_TOKEN")
        .current_dir("/")
        .output()
        .unwrap();
    let summary: Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(summary["started"].as_array().unwrap().len(), 3, "{summary}");

    let homes = [
        ("sisters", "main", root.join("sisters/main")),
        ("sisters", "Tab 2", root.join("sisters/tab-2")),
        ("anvil", "worker", root.join("anvil/worker")),
    ];
    let mut ports = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for (entity, label, home) in &homes {
        let env = eventually(WITHIN, "the agent's first start recorded", || {
            let e = (!lines(&home.join("starts.txt")).is_empty())
                .then(|| env_file(home))
                .flatten();
            async move { e }
        })
        .await;
        assert_eq!(env["CONCORD_HOME"], home.to_str().unwrap());
        assert_eq!(env["CONCORD_ENTITY"], *entity);
        assert_eq!(env["CONCORD_URL"], hub.url);
        assert!(env["CONCORD_SESSION_TOKEN"].len() > 20);
        assert!(env["CONCORD_INSTANCE_ID"].starts_with("ins_"));
        assert_eq!(
            lines(&home.join("pwd.txt")),
            vec![home.to_str().unwrap().to_string()]
        );
        let port: u16 = env["PORT"].parse().unwrap();
        assert!((21000..=21009).contains(&port));
        ports.insert(port);
        ids.insert(env["CONCORD_INSTANCE_ID"].clone());
        // What the hub knows: endpoint, process × endpoint in meta, the port lease.
        let inst = admin
            .get_instance(&env["CONCORD_INSTANCE_ID"])
            .await
            .unwrap();
        assert_eq!(inst.state, InstanceState::Live);
        assert_eq!(inst.label.as_deref(), Some(*label));
        assert_eq!(
            inst.endpoint.as_deref(),
            Some(format!("http://127.0.0.1:{port}").as_str())
        );
        let inst = eventually(WITHIN, "meta.process.state running", || {
            let (a, id) = (admin.clone(), inst.id.clone());
            async move {
                let i = a.get_instance(&id).await.unwrap();
                (i.meta["process"]["state"] == "running").then_some(i)
            }
        })
        .await;
        assert_eq!(inst.meta["state_detail"], "process up");
        assert_eq!(inst.meta["process"]["port"], port);
        assert_eq!(inst.meta["process"]["home"], home.to_str().unwrap());
        assert_eq!(inst.meta["process"]["restarts"], 0);
        let leases = admin.leases(None, Some(&inst.id)).await.unwrap().leases;
        assert_eq!(leases.len(), 1);
        assert!(leases[0].resource.ends_with(&format!(":{port}")));
        assert!(leases[0].resource.starts_with("port:"));
    }
    assert_eq!(ports.len(), 3, "distinct ports");
    assert_eq!(ids.len(), 3, "distinct instances");
    let main = admin.route("sisters").await.unwrap();
    assert_eq!(main.label.as_deref(), Some("main"));
    let schedules = admin.schedules().await.unwrap();
    assert!(schedules.iter().any(|s| s.name == "fleet-test-nightly"));
    // The agent's env from the file reaches it; the logs are in its home.
    assert_eq!(env_file(&homes[1].2).unwrap()["MODEL"], "k2");
    assert!(!env_file(&homes[0].2).unwrap().contains_key("MODEL"));
    assert!(homes[1].2.join("logs/stdout.log").exists());

    // ps: process, hub presence, role and port of each.
    let ps: Value =
        serde_json::from_str(&ok(&run_out(&hub, &["ps", fleet_s, "--json"], dir))).unwrap();
    let agents = ps["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 3);
    for a in agents {
        assert_eq!(a["process"], "running", "{a}");
        assert_eq!(a["presence"], "live", "{a}");
        assert!(ports.contains(&(a["port"].as_u64().unwrap() as u16)));
    }
    let main_row = agents.iter().find(|a| a["label"] == "main").unwrap();
    assert_eq!(main_row["role"], "primary");
    let table = ok(&run_out(&hub, &["ps", fleet_s], dir));
    assert!(table.starts_with("ENTITY"), "{table}");

    // `up` again, unchanged: nothing restarts.
    let again: Value =
        serde_json::from_str(&ok(&run_out(&hub, &["up", fleet_s, "--json"], dir))).unwrap();
    assert_eq!(again["unchanged"].as_array().unwrap().len(), 3, "{again}");
    assert!(again["started"].as_array().unwrap().is_empty());
    for (_, _, home) in &homes {
        assert_eq!(lines(&home.join("starts.txt")).len(), 1);
    }

    // Edit: drop the worker, change Tab 2's command. Only those two move.
    let tab_before = env_file(&homes[1].2).unwrap();
    let worker_id = env_file(&homes[2].2).unwrap()["CONCORD_INSTANCE_ID"].clone();
    let edited = THREE
        .replace("command = [\"./agent.sh\", \"v1\"]", "command = [\"./agent.sh\", \"v2\"]")
        .replace(
            "[[agent]]\nentity = \"anvil\"\nlabel = \"worker\"\ncommand = [\"./agent.sh\"]\nrestart = \"always\"\n",
            "",
        );
    assert_ne!(edited, THREE);
    std::fs::write(&fleet, fleet_file(&hub, "21000-21009", &edited)).unwrap();
    let diff: Value =
        serde_json::from_str(&ok(&run_out(&hub, &["up", fleet_s, "--json"], dir))).unwrap();
    assert_eq!(
        diff["restarted"],
        serde_json::json!(["sisters--tab-2"]),
        "{diff}"
    );
    assert_eq!(diff["stopped"], serde_json::json!(["anvil--worker"]));
    assert_eq!(diff["unchanged"], serde_json::json!(["sisters--main"]));
    assert_eq!(
        admin.get_instance(&worker_id).await.unwrap().state,
        InstanceState::Closed
    );
    let tab_after = eventually(WITHIN, "Tab 2 started again", || {
        let home = homes[1].2.clone();
        async move {
            (lines(&home.join("starts.txt")).len() == 2)
                .then(|| env_file(&home))
                .flatten()
        }
    })
    .await;
    assert_ne!(
        tab_after["CONCORD_INSTANCE_ID"],
        tab_before["CONCORD_INSTANCE_ID"]
    );
    assert_eq!(
        tab_after["PORT"], tab_before["PORT"],
        "a restarted agent keeps its port"
    );
    assert_eq!(lines(&homes[0].2.join("starts.txt")).len(), 1);

    // down: every instance closed, every process gone, the schedule removed.
    let states: Vec<Value> = std::fs::read_dir(root.join(".concord-fleet"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".state.json"))
        .map(|e| read_json(&e.path()))
        .collect();
    let pids: Vec<i64> = states
        .iter()
        .filter_map(|s| s["process"]["pid"].as_i64())
        .collect();
    let sups: Vec<i64> = std::fs::read_dir(root.join(".concord-fleet"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".agent.json"))
        .filter_map(|e| read_json(&e.path())["supervisor_pid"].as_i64())
        .collect();
    assert_eq!((pids.len(), sups.len()), (2, 2), "{states:?}");
    ok(&run_out(&hub, &["down", fleet_s], dir));
    for pid in pids.iter().chain(&sups) {
        assert!(!alive(*pid), "pid {pid} still runs after down");
    }
    assert!(instances(&hub, "live").await.is_empty());
    assert!(admin.leases(None, None).await.unwrap().leases.is_empty());
    assert!(!admin
        .schedules()
        .await
        .unwrap()
        .iter()
        .any(|s| s.name == "fleet-test-nightly"));
    let ps: Value =
        serde_json::from_str(&ok(&run_out(&hub, &["ps", fleet_s, "--json"], dir))).unwrap();
    assert!(ps["agents"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_crashing_agent_restarts_with_the_same_port_and_home_and_rotates_its_logs() {
    let hub = Hub::start();
    let admin = hub.admin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("agents");
    let mut reaper = Reaper::new(&root);
    // First start: a burst of output, then a crash. Later starts stay up.
    let agent = script(
        dir,
        "crashy.sh",
        r#"echo "$PORT $(pwd)" >> starts.txt
if [ ! -f crashed ]; then
  touch crashed
  i=0; while [ $i -lt 60 ]; do echo "line $i of output that fills the log quickly"; i=$((i+1)); done
  exit 3
fi
exec sleep 600"#,
    );
    let state = dir.join("crashy.state.json");
    let root_s = root.to_str().unwrap();
    let state_s = state.to_str().unwrap();
    reaper.runs.push(spawn_run(
        &hub,
        &[
            "--entity",
            "crashy",
            "--label",
            "flaky one",
            "--home-root",
            root_s,
            "--port-range",
            "21100-21109",
            "--restart",
            "on-failure",
            "--backoff-ms",
            "50",
            "--log-max-bytes",
            "1000",
            "--log-keep",
            "2",
            "--ttl-ms",
            "3000",
            "--state-file",
            state_s,
            "--",
            agent.to_str().unwrap(),
        ],
        &dir.join("run.log"),
    ));
    let home = root.join("crashy/flaky-one");
    let inst = eventually(WITHIN, "the second start running", || {
        let (a, state) = (admin.clone(), state.clone());
        async move {
            let id = read_json(&state)["instance"].as_str()?.to_string();
            let i = a.get_instance(&id).await.ok()?;
            (i.meta["process"]["restarts"] == 1 && i.meta["process"]["state"] == "running")
                .then_some(i)
        }
    })
    .await;
    // "running" means spawned; the script's own line can come a moment later.
    let starts = eventually(WITHIN, "the second start recorded", || {
        let starts = lines(&home.join("starts.txt"));
        async move { (starts.len() >= 2).then_some(starts) }
    })
    .await;
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(starts[0], starts[1], "same port and home after the restart");
    let port = inst.meta["process"]["port"].as_u64().unwrap();
    assert_eq!(starts[0], format!("{port} {}", home.display()));
    assert_eq!(inst.meta["process"]["last_exit"], "exit code 3");
    assert_eq!(inst.state, InstanceState::Live);
    // The instance outlives the crash: one registration for the whole run.
    assert_eq!(instances(&hub, "all").await.len(), 1);
    // 60 lines of ~45 bytes rotated at 1000 bytes, two old files kept.
    assert!(home.join("logs/stdout.log.1").exists());
    assert!(home.join("logs/stdout.log.2").exists());
    assert!(!home.join("logs/stdout.log.3").exists());
    assert!(
        std::fs::metadata(home.join("logs/stdout.log"))
            .unwrap()
            .len()
            <= 1000
    );
    let all_logs: String = ["stdout.log.2", "stdout.log.1", "stdout.log"]
        .iter()
        .map(|f| std::fs::read_to_string(home.join("logs").join(f)).unwrap())
        .collect();
    assert!(all_logs.contains("line 59 of output"));

    // SIGTERM: the child stops, the lease goes, the instance closes, exit 0.
    let child_pid = inst.meta["process"]["pid"].as_i64().unwrap();
    let run = reaper.runs.last_mut().unwrap();
    signal(run.id() as i64, libc::SIGTERM);
    let status = wait_exit(run).await;
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(dir.join("run.log")).unwrap()
    );
    assert!(!alive(child_pid));
    assert_eq!(
        admin.get_instance(&inst.id).await.unwrap().state,
        InstanceState::Closed
    );
    assert!(admin.leases(None, None).await.unwrap().leases.is_empty());
    assert_eq!(read_json(&state)["process"]["state"], "exited");
}

#[tokio::test]
async fn a_hung_agent_loses_its_presence_and_regains_it_when_healthy() {
    let hub = Hub::start();
    let admin = hub.admin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("agents");
    let mut reaper = Reaper::new(&root);
    // The agent is a real HTTP server with /healthz: another concord hub.
    let agent = script(
        dir,
        "server.sh",
        r#"unset CONCORD_DATABASE_URL CONCORD_ADMIN_TOKEN CONCORD_DATA_DIR
exec "$AGENT_BIN" serve --listen "127.0.0.1:$PORT" --data-dir ./hub-data --durability normal"#,
    );
    let state = dir.join("hung.state.json");
    reaper.runs.push(spawn_run(
        &hub,
        &[
            "--entity",
            "server",
            "--label",
            "api",
            "--home-root",
            root.to_str().unwrap(),
            "--port-range",
            "21200-21209",
            "--health-url",
            "/healthz",
            "--health-interval-ms",
            "200",
            "--health-failures",
            "2",
            "--ttl-ms",
            "1500",
            "--state-file",
            state.to_str().unwrap(),
            "--env",
            &format!("AGENT_BIN={BIN}"),
            "--",
            agent.to_str().unwrap(),
        ],
        &dir.join("run.log"),
    ));
    let first = eventually(WITHIN, "process up, endpoint up", || {
        let (a, state) = (admin.clone(), state.clone());
        async move {
            let id = read_json(&state)["instance"].as_str()?.to_string();
            let i = a.get_instance(&id).await.ok()?;
            (i.meta["state_detail"] == "process up, endpoint up").then_some(i)
        }
    })
    .await;
    let pid = first.meta["process"]["pid"].as_i64().unwrap();

    // Hang it: the process is there, its endpoint does not answer.
    signal(pid, libc::SIGSTOP);
    let expired = eventually(WITHIN, "the hub expires the hung agent", || {
        let (a, id) = (admin.clone(), first.id.clone());
        async move {
            let i = a.get_instance(&id).await.ok()?;
            (i.state == InstanceState::Expired).then_some(i)
        }
    })
    .await;
    let detail = expired.meta["state_detail"].as_str().unwrap();
    assert!(detail.starts_with("process up, endpoint down"), "{detail}");
    assert_eq!(expired.meta["process"]["state"], "running");
    assert!(instances(&hub, "live").await.is_empty());
    assert!(read_json(&state)["hub"]
        .as_str()
        .unwrap()
        .contains("withheld"));

    // Unhang it: healthy again, present again (a new instance, same port).
    signal(pid, libc::SIGCONT);
    let back = eventually(WITHIN, "the agent present again", || {
        let hub = &hub;
        async move {
            let live = instances(hub, "live").await;
            live.into_iter()
                .find(|i| i.meta["state_detail"] == "process up, endpoint up")
        }
    })
    .await;
    assert_ne!(back.id, first.id);
    assert_eq!(back.endpoint, first.endpoint);
    assert_eq!(back.meta["process"]["pid"], pid);
    // The supervisor takes the port again right after registering (the lease
    // needs the instance), so the instance can be seen live a moment before it.
    let leases = eventually(WITHIN, "the port leased again by the new instance", || {
        let (a, id) = (admin.clone(), back.id.clone());
        async move {
            let leases = a.leases(None, Some(&id)).await.ok()?.leases;
            (!leases.is_empty()).then_some(leases)
        }
    })
    .await;
    assert_eq!(leases.len(), 1, "one port lease: {leases:?}");
    // The child can find its new session in its home.
    let session = read_json(&root.join("server/api/concord-session.json"));
    assert_eq!(session["instance_id"], back.id.as_str());

    let run = reaper.runs.last_mut().unwrap();
    signal(run.id() as i64, libc::SIGTERM);
    assert!(wait_exit(run).await.success());
    assert!(!alive(pid));
}

#[tokio::test]
async fn twenty_agents_started_at_once_get_twenty_ports() {
    let hub = Hub::start();
    let admin = hub.admin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("agents");
    let mut reaper = Reaper::new(&root);
    let agent = script(dir, "agent.sh", "echo \"$PORT\" > port.txt\nexec sleep 600");
    for i in 0..20 {
        let label = format!("w{i}");
        reaper.runs.push(spawn_run(
            &hub,
            &[
                "--entity",
                "swarm",
                "--label",
                &label,
                "--home-root",
                root.to_str().unwrap(),
                "--port-range",
                "21300-21339",
                "--ttl-ms",
                "5000",
                "--",
                agent.to_str().unwrap(),
            ],
            &dir.join(format!("run-{i}.log")),
        ));
    }
    let ports: Vec<u16> = eventually(Duration::from_secs(60), "twenty ports", || {
        let root = root.clone();
        async move {
            let ports: Vec<u16> = (0..20)
                .filter_map(|i| {
                    std::fs::read_to_string(root.join(format!("swarm/w{i}/port.txt")))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()
                })
                .collect();
            (ports.len() == 20).then_some(ports)
        }
    })
    .await;
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), 20, "duplicate ports: {ports:?}");
    assert!(distinct.iter().all(|p| (21300..=21339).contains(p)));
    let leases = admin.leases(None, None).await.unwrap().leases;
    assert_eq!(leases.len(), 20);
    let holders: BTreeSet<&str> = leases.iter().map(|l| l.holder.as_str()).collect();
    assert_eq!(holders.len(), 20);

    for r in &reaper.runs {
        signal(r.id() as i64, libc::SIGTERM);
    }
    for r in reaper.runs.iter_mut() {
        assert!(wait_exit(r).await.success());
    }
    assert!(instances(&hub, "live").await.is_empty());
    assert!(admin.leases(None, None).await.unwrap().leases.is_empty());
}

#[tokio::test]
async fn bad_input_is_refused_with_nothing_started() {
    let hub = Hub::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("agents");
    let _reaper = Reaper::new(&root);
    let marker = script(dir, "agent.sh", "touch started.txt\nexec sleep 600");
    let root_s = root.to_str().unwrap();
    let base = |cmd: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "run",
            "--entity",
            "bad",
            "--label",
            "x",
            "--home-root",
            root_s,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push("--".into());
        v.push(cmd.into());
        v
    };
    let run = |args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_out(&hub, &a, dir)
    };

    let err = failed(&run(base("./nope.sh", &[])));
    assert!(err.contains("\"./nope.sh\" does not exist"), "{err}");
    let err = failed(&run(base("no-such-program-anywhere", &[])));
    assert!(err.contains("not found on PATH"), "{err}");
    std::fs::write(dir.join("a-file"), "").unwrap();
    let mut args = base(marker.to_str().unwrap(), &[]);
    args[6] = dir.join("a-file").to_string_lossy().into_owned();
    let err = failed(&run(args));
    assert!(err.contains("cannot create the agent's home"), "{err}");
    let err = failed(&run(base(
        marker.to_str().unwrap(),
        &["--port-range", "900-1000"],
    )));
    assert!(
        err.contains("--port-range") && err.contains("1024"),
        "{err}"
    );
    assert!(
        instances(&hub, "all").await.is_empty(),
        "nothing registered"
    );

    // A port range with its only port taken: exhausted, the instance closed again.
    let taken = std::net::TcpListener::bind("0.0.0.0:21400").unwrap();
    let err = failed(&run(base(
        marker.to_str().unwrap(),
        &["--port-range", "21400-21400"],
    )));
    assert!(err.contains("port range 21400-21400 exhausted"), "{err}");
    drop(taken);
    assert!(instances(&hub, "live").await.is_empty());
    assert!(
        !root.join("bad/x/started.txt").exists(),
        "the child never started"
    );

    // Fleet files: a syntax error names line and column; nothing starts.
    std::fs::write(dir.join("token"), &hub.admin).unwrap();
    let fleet = dir.join("fleet.toml");
    let good_agent = "[[agent]]\nentity = \"a\"\nlabel = \"one\"\ncommand = [\"./agent.sh\"]\n";
    std::fs::write(
        &fleet,
        fleet_file(&hub, "21410-21419", &format!("{good_agent}\n[[agent]]\nentity = \"a\"\nlabel = \"two\ncommand = [\"./agent.sh\"]\n")),
    )
    .unwrap();
    let fleet_s = fleet.to_str().unwrap();
    let err = failed(&run_out(&hub, &["up", fleet_s], dir));
    assert!(err.contains("line 15, column"), "{err}");
    // Unknown keys, duplicate labels, a missing program, too few ports: named
    // precisely, and refused before anything starts.
    let two = |label: &str, program: &str| {
        format!(
            "{good_agent}\n{}",
            good_agent
                .replace("one", label)
                .replace("./agent.sh", program)
        )
    };
    for (range, body, wanted) in [
        (
            "21410-21419",
            format!("{good_agent}restrat = \"always\"\n"),
            "unknown field `restrat`",
        ),
        ("21410-21419", two("One", "./agent.sh"), "agent[1].label"),
        (
            "21410-21419",
            two("two", "./missing.sh"),
            r#"missing.sh" does not exist"#,
        ),
        (
            "21410-21410",
            two("two", "./agent.sh"),
            "port_range: 21410-21410 has 1 ports but 2 agents",
        ),
    ] {
        std::fs::write(&fleet, fleet_file(&hub, range, &body)).unwrap();
        let err = failed(&run_out(&hub, &["up", fleet_s], dir));
        assert!(err.contains(wanted), "{wanted} not in {err}");
    }
    assert!(
        instances(&hub, "all").await.len() <= 1,
        "only the closed one of the exhausted run"
    );
    assert!(instances(&hub, "live").await.is_empty());
    assert!(!root.join("a/one/started.txt").exists());
    assert!(
        !root.join(".concord-fleet").exists()
            || std::fs::read_dir(root.join(".concord-fleet"))
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().ends_with(".agent.json"))
    );
}

#[tokio::test]
async fn the_agent_keeps_running_while_the_hub_is_down_and_is_present_again_after() {
    let mut hub = Hub::start();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = dir.join("agents");
    let mut reaper = Reaper::new(&root);
    let agent = script(dir, "agent.sh", RECORDING_AGENT);
    let state = dir.join("steady.state.json");
    reaper.runs.push(spawn_run(
        &hub,
        &[
            "--entity",
            "steady",
            "--label",
            "main",
            "--home-root",
            root.to_str().unwrap(),
            "--port-range",
            "21500-21509",
            "--ttl-ms",
            "1500",
            "--state-file",
            state.to_str().unwrap(),
            "--",
            agent.to_str().unwrap(),
        ],
        &dir.join("run.log"),
    ));
    let pid = eventually(WITHIN, "the agent running and registered", || {
        let state = state.clone();
        async move {
            let s = read_json(&state);
            (s["process"]["state"] == "running" && s["instance"].is_string())
                .then(|| s["process"]["pid"].as_i64())
                .flatten()
        }
    })
    .await;
    let starts = root.join("steady/main/starts.txt");
    eventually(WITHIN, "the agent's start recorded", || {
        let n = lines(&starts).len();
        async move { (n > 0).then_some(()) }
    })
    .await;

    hub.kill9();
    eventually(WITHIN, "the supervisor notices the hub is gone", || {
        let state = state.clone();
        async move {
            let s = read_json(&state);
            s["hub"].as_str()?.starts_with("unreachable").then_some(())
        }
    })
    .await;
    assert!(alive(pid), "the child keeps running without the hub");
    assert_eq!(read_json(&state)["process"]["state"], "running");
    assert_eq!(lines(&starts).len(), 1);

    hub.respawn_same_port();
    let admin = hub.admin();
    let back = eventually(WITHIN, "the agent present again", || {
        let admin = admin.clone();
        async move {
            let live = admin
                .list_instances(Some("steady"), None, Some("live"))
                .await
                .ok()?
                .instances;
            live.into_iter().find(|i| i.meta["process"]["pid"] == pid)
        }
    })
    .await;
    assert_eq!(back.meta["process"]["restarts"], 0);
    assert_eq!(lines(&starts).len(), 1);

    let run = reaper.runs.last_mut().unwrap();
    signal(run.id() as i64, libc::SIGTERM);
    assert!(wait_exit(run).await.success());
    assert!(!alive(pid));
}
