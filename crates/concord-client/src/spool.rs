//! Degraded mode (ADR-012, "remote → local-only, never block"): when no hub
//! answers, writes that are safe to replay wait in a local spool file and are
//! sent again, in order, when a hub answers.
//!
//! Files, one set per identity (`<dir>/<entity>-<label>.spool`):
//!
//! - `.spool`: append-only JSON lines ([`record::Record`]), each fsynced before
//!   the caller hears "spooled", so a spooled write survives `kill -9`. A torn
//!   last line (the process died mid-append) was never acknowledged and is cut
//!   off at open.
//! - `.cursor`: the `n` of the last record finished, replaced atomically
//!   (write, fsync, rename) after each one; a crash during replay resumes after
//!   it. A record the hub applied just before a crash is sent again, and its
//!   idempotency key makes the hub answer with the first result instead of
//!   applying it twice.
//! - `.rejected`: JSON lines of records the hub refused for what they are
//!   (4xx), with the error: set aside so they never block the queue, never
//!   dropped silently.
//!
//! The spool file is emptied once every record in it is finished. One process
//! holds a spool at a time (an exclusive `flock`); a second process of the same
//! identity takes the next free slot (`<entity>-<label>~2.spool`, …), and a later
//! process replays any slot left behind.

pub mod record;

use crate::Client;
use concord_core::{Error, ErrorCode, Result, Timestamp};
use record::{Record, SpoolKind, Verdict};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Default bound of one spool file.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// How many processes of one identity may each hold a spool on one machine.
const MAX_SLOTS: u32 = 16;

/// Where spools live by default: `$XDG_STATE_HOME/concord/spool`, else
/// `~/.local/state/concord/spool` (state, not cache: it holds unsent writes).
pub fn default_dir() -> Option<PathBuf> {
    if let Some(s) = std::env::var_os("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(s).join("concord").join("spool"));
    }
    std::env::var_os("HOME")
        .filter(|s| !s.is_empty())
        .map(|h| PathBuf::from(h).join(".local/state/concord/spool"))
}

/// What [`Client::spool_status`] reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpoolStatus {
    /// The spool file.
    pub path: PathBuf,
    /// Writes waiting to be sent.
    pub pending: usize,
    /// Age of the oldest waiting write.
    pub oldest_age_ms: Option<u64>,
    /// Writes the hub refused on replay, kept in the `.rejected` file.
    pub rejected: usize,
    pub rejected_path: PathBuf,
    /// Size of the spool file and its bound.
    pub bytes: u64,
    pub max_bytes: u64,
}

/// What one replay pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplayReport {
    pub delivered: usize,
    pub rejected: usize,
    /// Why the pass stopped with writes still pending (the hub is still away…).
    pub stopped: Option<Error>,
}

/// The open spool of one identity: its files and the records not yet finished.
pub struct Spool {
    path: PathBuf,
    cursor_path: PathBuf,
    rejected_path: PathBuf,
    max_bytes: u64,
    /// Mirrors `state.pending.len()` so the common case (nothing pending) skips
    /// the lock.
    pending_count: AtomicUsize,
    /// An async lock: replay holds it across its requests so that a new write
    /// waits for the records before it.
    state: tokio::sync::Mutex<State>,
}

struct State {
    /// The spool file, open for append, holding the process's `flock`.
    file: File,
    bytes: u64,
    cursor: u64,
    next_n: u64,
    pending: VecDeque<Record>,
    rejected: usize,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("spool: {what} {}: {e}", path.display()))
}

/// Takes the process's exclusive lock on an open spool file; false if another
/// process holds it.
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a file descriptor this File owns; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

/// Replaces `path` with `text` so that a crash leaves the old or the new
/// content, never a mix.
fn replace_file(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Runs the spool's file work (writes, fsyncs, renames) from async code. On a
/// multi-threaded runtime the worker first hands its other tasks to another
/// thread (`block_in_place`), so a slow disk does not stall them: in `concord
/// run` the instance's heartbeats share that runtime, and a degraded-mode write
/// waits for an fsync. A current-thread runtime has no other worker to take
/// them, so there the work runs in place, as before.
fn off_the_workers<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

fn append_line(path: &Path, line: &str) -> std::io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(line.as_bytes())?;
    f.sync_data()
}

fn count_lines(path: &Path) -> usize {
    fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

impl Spool {
    /// Opens (creating `dir` if needed) the spool of `entity`/`label` with the
    /// default bound.
    pub fn open(dir: &Path, entity: &str, label: &str) -> Result<Arc<Spool>> {
        Spool::open_bounded(dir, entity, label, DEFAULT_MAX_BYTES)
    }

    /// Opens the first slot of this identity that no other process holds, reads
    /// what it holds, cuts a torn last line, and sets damaged lines aside in
    /// `.rejected`.
    pub fn open_bounded(
        dir: &Path,
        entity: &str,
        label: &str,
        max_bytes: u64,
    ) -> Result<Arc<Spool>> {
        fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
        let base = format!("{}-{}", record::slug(entity), record::slug(label));
        for slot in 1..=MAX_SLOTS {
            let stem = if slot == 1 {
                base.clone()
            } else {
                format!("{base}~{slot}")
            };
            let path = dir.join(format!("{stem}.spool"));
            let mut file = OpenOptions::new()
                .read(true)
                .append(true)
                .create(true)
                .open(&path)
                .map_err(|e| io_err("opening", &path, e))?;
            if !try_lock(&file).map_err(|e| io_err("locking", &path, e))? {
                continue;
            }
            let cursor_path = dir.join(format!("{stem}.cursor"));
            let rejected_path = dir.join(format!("{stem}.rejected"));
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)
                .map_err(|e| io_err("reading", &path, e))?;
            let parsed = record::parse(&bytes);
            if parsed.valid_len < bytes.len() as u64 {
                file.set_len(parsed.valid_len)
                    .and_then(|_| file.sync_all())
                    .map_err(|e| io_err("cutting the torn last line of", &path, e))?;
            }
            let cursor = fs::read_to_string(&cursor_path)
                .map(|t| record::parse_cursor(&t))
                .unwrap_or(0);
            let next_n = record::next_n(&parsed.records, cursor);
            let pending: VecDeque<Record> = record::pending(parsed.records, cursor).into();
            let mut bytes_now = parsed.valid_len;
            if !parsed.damaged.is_empty() {
                for line in &parsed.damaged {
                    let entry = json!({
                        "rejected_at": Timestamp::now().millis(),
                        "error": {"code": "bad_request", "message": "damaged spool line: not a record"},
                        "line": line,
                    });
                    append_line(&rejected_path, &format!("{entry}\n"))
                        .map_err(|e| io_err("writing", &rejected_path, e))?;
                }
                // Rewrite without the damaged lines, so they are reported once.
                let text: String = pending.iter().map(Record::to_line).collect();
                replace_file(&path, &text).map_err(|e| io_err("rewriting", &path, e))?;
                file = OpenOptions::new()
                    .read(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| io_err("opening", &path, e))?;
                if !try_lock(&file).map_err(|e| io_err("locking", &path, e))? {
                    return Err(Error::internal(format!(
                        "spool {}: lost the lock while rewriting it",
                        path.display()
                    )));
                }
                bytes_now = text.len() as u64;
            }
            let spool = Spool {
                path,
                cursor_path,
                pending_count: AtomicUsize::new(pending.len()),
                max_bytes,
                state: tokio::sync::Mutex::new(State {
                    file,
                    bytes: bytes_now,
                    cursor,
                    next_n,
                    pending,
                    rejected: count_lines(&rejected_path),
                }),
                rejected_path,
            };
            return Ok(Arc::new(spool));
        }
        Err(Error::internal(format!(
            "spool: all {MAX_SLOTS} slots of {base} in {} are held by other processes",
            dir.display()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn rejected_path(&self) -> &Path {
        &self.rejected_path
    }

    /// Writes waiting to be sent (without waiting for a replay in progress).
    pub fn pending(&self) -> usize {
        self.pending_count.load(Ordering::Acquire)
    }

    pub async fn status(&self) -> SpoolStatus {
        let st = self.state.lock().await;
        let now = Timestamp::now().millis();
        SpoolStatus {
            path: self.path.clone(),
            pending: st.pending.len(),
            oldest_age_ms: st.pending.front().map(|r| (now - r.at).max(0) as u64),
            rejected: st.rejected,
            rejected_path: self.rejected_path.clone(),
            bytes: st.bytes,
            max_bytes: self.max_bytes,
        }
    }

    /// Appends a record and fsyncs it; the write is spooled once this returns Ok.
    fn append(&self, st: &mut State, kind: SpoolKind, body: Value) -> Result<Record> {
        let rec = Record {
            n: st.next_n,
            at: Timestamp::now().millis(),
            kind,
            body,
        };
        let line = rec.to_line();
        if st.bytes + line.len() as u64 > self.max_bytes {
            return Err(Error::unavailable(format!(
                "hub unreachable and the spool {} is full ({} of {} bytes, {} writes waiting): \
                 this write was NOT spooled",
                self.path.display(),
                st.bytes,
                self.max_bytes,
                st.pending.len()
            ))
            .with_details(json!({"spooled": false, "spool_full": true})));
        }
        let written = st
            .file
            .write_all(line.as_bytes())
            .and_then(|_| st.file.sync_data());
        if let Err(e) = written {
            // Cut a partial line so the next append starts on a line of its own.
            let _ = st.file.set_len(st.bytes);
            return Err(
                io_err("appending to", &self.path, e).with_details(json!({"spooled": false}))
            );
        }
        st.bytes += line.len() as u64;
        st.next_n += 1;
        st.pending.push_back(rec.clone());
        self.pending_count
            .store(st.pending.len(), Ordering::Release);
        Ok(rec)
    }

    /// Marks the front record finished: the cursor moves past it on disk first.
    fn finish_front(&self, st: &mut State) -> Result<()> {
        let Some(front) = st.pending.front() else {
            return Ok(());
        };
        let n = front.n;
        replace_file(&self.cursor_path, &format!("{n}\n"))
            .map_err(|e| io_err("writing", &self.cursor_path, e))?;
        st.cursor = n;
        st.pending.pop_front();
        self.pending_count
            .store(st.pending.len(), Ordering::Release);
        Ok(())
    }

    /// Empties the spool file once every record in it is finished (the cursor
    /// keeps the numbering going).
    fn compact(&self, st: &mut State) -> Result<()> {
        if st.pending.is_empty() && st.bytes > 0 {
            st.file
                .set_len(0)
                .and_then(|_| st.file.sync_all())
                .map_err(|e| io_err("emptying", &self.path, e))?;
            st.bytes = 0;
        }
        Ok(())
    }

    fn reject_front(&self, st: &mut State, e: &Error) -> Result<()> {
        let Some(front) = st.pending.front() else {
            return Ok(());
        };
        let entry = json!({
            "n": front.n,
            "at": front.at,
            "kind": front.kind,
            "body": front.body,
            "rejected_at": Timestamp::now().millis(),
            "error": e.to_body()["error"],
        });
        append_line(&self.rejected_path, &format!("{entry}\n"))
            .map_err(|err| io_err("writing", &self.rejected_path, err))?;
        st.rejected += 1;
        self.finish_front(st)
    }

    /// Sends the pending records in order with `client`'s credentials, until all
    /// are finished or the hub cannot take one now.
    async fn drain(&self, st: &mut State, client: &Client) -> ReplayReport {
        let mut report = ReplayReport::default();
        while let Some(front) = st.pending.front() {
            let (kind, body) = (front.kind, front.body.clone());
            let sent = client.send_write(kind, &body).await;
            let step = match sent {
                Ok(_) => {
                    report.delivered += 1;
                    off_the_workers(|| self.finish_front(st))
                }
                Err(e) => match record::verdict(&e, client.instance()) {
                    Verdict::Retry => {
                        report.stopped = Some(e);
                        return report;
                    }
                    Verdict::Reject => {
                        report.rejected += 1;
                        off_the_workers(|| self.reject_front(st, &e))
                    }
                },
            };
            if let Err(e) = step {
                report.stopped = Some(e);
                return report;
            }
        }
        if let Err(e) = off_the_workers(|| self.compact(st)) {
            report.stopped = Some(e);
        }
        report
    }

    /// One replay pass (see [`Client::replay_spool`]).
    pub(crate) async fn replay(&self, client: &Client) -> ReplayReport {
        if self.pending() == 0 {
            return ReplayReport::default();
        }
        let mut st = self.state.lock().await;
        self.drain(&mut st, client).await
    }

    /// A spoolable write with its keys already set: sent at once when nothing
    /// waits before it, else after the records before it, else spooled.
    pub(crate) async fn write(
        &self,
        client: &Client,
        kind: SpoolKind,
        body: Value,
    ) -> Result<Value> {
        if self.pending() == 0 {
            match client.send_write(kind, &body).await {
                Err(e) if e.code == ErrorCode::Unavailable => {
                    let mut st = self.state.lock().await;
                    return Err(self.spooled(&mut st, kind, body, &e));
                }
                other => return other,
            }
        }
        let mut st = self.state.lock().await;
        let report = self.drain(&mut st, client).await;
        if let Some(why) = report.stopped {
            return Err(self.spooled(&mut st, kind, body, &why));
        }
        match client.send_write(kind, &body).await {
            Err(e) if e.code == ErrorCode::Unavailable => {
                Err(self.spooled(&mut st, kind, body, &e))
            }
            other => other,
        }
    }

    /// Spools a write that could not go out, and says so in the error the caller
    /// gets: `unavailable`, with `details.spooled` true (or false and why not).
    fn spooled(&self, st: &mut State, kind: SpoolKind, body: Value, cause: &Error) -> Error {
        let keys = record::keys(kind, &body);
        match off_the_workers(|| self.append(st, kind, body)) {
            Ok(rec) => Error::unavailable(format!(
                "hub unreachable; spooled, will be delivered when it returns ({} waiting in {}; cause: {})",
                st.pending.len(),
                self.path.display(),
                cause.message
            ))
            .with_details(json!({
                "spooled": true,
                "spool": self.path,
                "spool_n": rec.n,
                "pending": st.pending.len(),
                "idempotency_keys": keys,
                "cause": cause.to_body()["error"],
            })),
            Err(e) => {
                let mut e = e;
                e.message = format!("{} (cause: {})", e.message, cause.message);
                e
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(i: u64) -> Value {
        json!({"topic": "t.x", "data": {"i": i}, "idempotency_key": format!("k{i}")})
    }

    /// On a multi-threaded runtime the file work leaves the worker
    /// (`block_in_place`); the record is on disk all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spooling_on_a_multi_threaded_runtime_writes_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let sp = Spool::open(dir.path(), "e", "l").unwrap();
        let cause = Error::unavailable("hub unreachable: test");
        let e = {
            let mut st = sp.state.lock().await;
            sp.spooled(&mut st, SpoolKind::Event, body(1), &cause)
        };
        assert!(crate::spooled(&e), "{e:?}");
        assert_eq!(sp.pending(), 1);
        drop(sp);
        let again = Spool::open(dir.path(), "e", "l").unwrap();
        assert_eq!(again.pending(), 1, "the record survives a reopen");
    }

    #[tokio::test]
    async fn appends_survive_reopen_and_a_torn_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let sp = Spool::open(dir.path(), "sisters", "Tab 2").unwrap();
            assert_eq!(sp.path(), dir.path().join("sisters-tab-2.spool"));
            let mut st = sp.state.lock().await;
            for i in 1..=3 {
                sp.append(&mut st, SpoolKind::Event, body(i)).unwrap();
            }
        }
        // A crash in the middle of a fourth append.
        let path = dir.path().join("sisters-tab-2.spool");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"n\":4,\"at\":1,\"kind\":\"ev").unwrap();
        drop(f);
        let sp = Spool::open(dir.path(), "sisters", "Tab 2").unwrap();
        assert_eq!(sp.pending(), 3);
        let st = sp.state.lock().await;
        assert_eq!(st.next_n, 4);
        assert_eq!(fs::metadata(&path).unwrap().len(), st.bytes);
        let ns: Vec<u64> = st.pending.iter().map(|r| r.n).collect();
        assert_eq!(ns, vec![1, 2, 3]);
    }

    #[tokio::test]
    async fn the_cursor_skips_finished_records_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let sp = Spool::open(dir.path(), "e", "l").unwrap();
            let mut st = sp.state.lock().await;
            for i in 1..=3 {
                sp.append(&mut st, SpoolKind::Event, body(i)).unwrap();
            }
            sp.finish_front(&mut st).unwrap();
            sp.reject_front(&mut st, &Error::bad_request("no")).unwrap();
        }
        let sp = Spool::open(dir.path(), "e", "l").unwrap();
        let status = sp.status().await;
        assert_eq!(status.pending, 1);
        assert_eq!(status.rejected, 1);
        let st = sp.state.lock().await;
        assert_eq!(st.pending.front().unwrap().body, body(3));
        assert_eq!(st.next_n, 4);
    }

    #[tokio::test]
    async fn a_full_spool_refuses_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let line = Record {
            n: 1,
            at: Timestamp::now().millis(),
            kind: SpoolKind::Event,
            body: body(1),
        }
        .to_line();
        let sp = Spool::open_bounded(dir.path(), "e", "l", line.len() as u64 + 10).unwrap();
        let mut st = sp.state.lock().await;
        sp.append(&mut st, SpoolKind::Event, body(1)).unwrap();
        let e = sp.append(&mut st, SpoolKind::Event, body(2)).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(e.message.contains("NOT spooled"), "{}", e.message);
        assert_eq!(e.details["spool_full"], true);
        assert_eq!(st.pending.len(), 1);
    }

    #[tokio::test]
    async fn compaction_empties_the_file_and_numbering_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let sp = Spool::open(dir.path(), "e", "l").unwrap();
        let mut st = sp.state.lock().await;
        for i in 1..=2 {
            sp.append(&mut st, SpoolKind::Event, body(i)).unwrap();
        }
        sp.finish_front(&mut st).unwrap();
        sp.finish_front(&mut st).unwrap();
        sp.compact(&mut st).unwrap();
        assert_eq!(fs::metadata(sp.path()).unwrap().len(), 0);
        let rec = sp.append(&mut st, SpoolKind::Event, body(3)).unwrap();
        assert_eq!(rec.n, 3);
        drop(st);
        drop(sp);
        let sp = Spool::open(dir.path(), "e", "l").unwrap();
        assert_eq!(sp.pending(), 1);
    }

    #[tokio::test]
    async fn damaged_lines_go_to_rejected_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e-l.spool");
        let good = Record {
            n: 1,
            at: 5,
            kind: SpoolKind::Event,
            body: body(1),
        }
        .to_line();
        fs::write(&path, format!("garbage\n{good}")).unwrap();
        {
            let sp = Spool::open(dir.path(), "e", "l").unwrap();
            assert_eq!(sp.pending(), 1);
            assert_eq!(sp.status().await.rejected, 1);
        }
        let sp = Spool::open(dir.path(), "e", "l").unwrap();
        assert_eq!(sp.pending(), 1);
        assert_eq!(sp.status().await.rejected, 1);
    }

    #[tokio::test]
    async fn a_second_process_of_one_identity_takes_the_next_slot() {
        let dir = tempfile::tempdir().unwrap();
        let a = Spool::open(dir.path(), "e", "l").unwrap();
        let b = Spool::open(dir.path(), "e", "l").unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(b.path(), dir.path().join("e-l~2.spool"));
    }
}
