//! The HTTP API fuzzed from its own contract: Schemathesis (PyPI) reads
//! `/openapi.json`, generates valid and invalid requests for every operation
//! (coverage, fuzzing and stateful phases) with an admin token, and checks that
//! no answer is a 5xx, every answer matches the documented schema, status codes,
//! content types and headers, whatever the schema forbids is refused, and nothing
//! hangs (`--max-response-time`). Its settings are in `tests/fuzz/schemathesis.toml`.
//!
//! Short in CI (`CONCORD_FUZZ_EXAMPLES`, default 10 per operation, fixed seed);
//! `scripts/fuzz` runs the long form. Without Schemathesis the test skips loudly,
//! and fails when `CONCORD_REQUIRE_ALL=1`.

use crate::harness::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `schemathesis` executable: `$CONCORD_SCHEMATHESIS`, the repo's `.venv`
/// (`.ci/run` installs it there), or PATH.
fn schemathesis() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("CONCORD_SCHEMATHESIS")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(repo_root().join(".venv/bin/schemathesis"));
    candidates.push(PathBuf::from("schemathesis"));
    for c in candidates {
        let ok = Command::new(&c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(c);
        }
    }
    let msg = "fuzz: SKIPPED: schemathesis not found (`.venv/bin/pip install schemathesis`)";
    if require_all() {
        panic!("CONCORD_REQUIRE_ALL=1 but {msg}");
    }
    eprintln!("{msg}");
    None
}

#[test]
fn the_api_survives_schemathesis() {
    let Some(st) = schemathesis() else { return };
    let hub = Hub::start();
    let examples = std::env::var("CONCORD_FUZZ_EXAMPLES").unwrap_or_else(|_| "10".into());
    let seed = std::env::var("CONCORD_FUZZ_SEED").unwrap_or_else(|_| "1".into());
    let workdir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(&st)
        .current_dir(workdir.path())
        .arg("--config-file")
        .arg(repo_root().join("tests/fuzz/schemathesis.toml"))
        .args(["run", &format!("{}/openapi.json", hub.url)])
        .args(["-H", &format!("Authorization: Bearer {}", hub.admin)])
        .args(["--max-examples", &examples, "--seed", &seed])
        .args(["--request-timeout", "20", "--max-response-time", "5"])
        .args(["--no-shrink", "--max-failures", "20", "--workers", "2"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start schemathesis");
    // Bounded: a hang anywhere fails the test instead of stalling CI.
    let deadline = Instant::now() + Duration::from_secs(900);
    while child.try_wait().expect("poll schemathesis").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("schemathesis did not finish within 15 minutes");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().expect("schemathesis output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis found failures ({}):\n{stdout}\n{stderr}\n--- hub log\n{}",
        out.status,
        hub.log()
    );
    // The run's numbers (shown with --nocapture).
    let summary: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect();
    eprintln!("schemathesis:\n{}", summary.join("\n"));
    assert!(
        !hub.log().contains("panicked"),
        "the hub logged a panic:\n{}",
        hub.log()
    );
}
