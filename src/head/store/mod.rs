//! The store: JSON objects under `kind/name` keys, kept by a backend, with group commit.
//!
//! Each object is one key, so the layout is the same in both backends: a redb file in the
//! state directory (the default) or an etcd cluster shared by several heads. Every write is
//! durable when it returns; writes that arrive while a commit is under way are committed
//! together by the next one, so concurrent writers do not queue for a commit each, and a slow
//! commit waits briefly for the writers of the last one.

mod embedded;
mod etcd;
mod mirror;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {message} (refusing to start on a store that cannot be read; restore it or move it away)")]
    Open { path: String, message: String },
    #[error(
        "store {path} is in use by another process (a head, or `clusterfs store`, on this state directory): stop that one, or give this head a state directory of its own"
    )]
    InUse { path: String },
    #[error("store: {0}")]
    Db(String),
    #[error("store object {key}: {message}")]
    Decode { key: String, message: String },
    #[error("the store is unreachable, so writes are refused until it answers (reads show what this head has): {0}")]
    Unavailable(String),
}

impl StoreError {
    /// Whether the state directory's disk is full (ENOSPC from the file system).
    pub fn is_full(&self) -> bool {
        let text = self.to_string();
        text.contains("os error 28") || text.contains("No space left on device")
    }
}

impl From<StoreError> for clusterfs_fs::FsError {
    /// What a caller of the tree gets: ENOSPC when the head's disk is full, EROFS when the
    /// store cannot be reached (the tree reads but takes no change), EIO otherwise.
    fn from(e: StoreError) -> clusterfs_fs::FsError {
        use clusterfs_fs::Errno;
        let errno = match &e {
            StoreError::Unavailable(_) => Errno::RoFs,
            _ if e.is_full() => Errno::NoSpc,
            _ => Errno::Io,
        };
        clusterfs_fs::FsError::new(errno, format!("the store failed: {e}"))
    }
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Where the objects are kept.
pub trait Backend: std::fmt::Debug + Send + Sync {
    /// Applies the writers' groups of changes; each group is applied whole or not at all.
    fn commit(&self, groups: &[Vec<Change>]) -> Result<(), StoreError>;
    /// Every key starting with `prefix`, in key order, with its value.
    fn scan(&self, prefix: &str) -> Result<Objects, StoreError>;
    /// Sets `key` to `value` unless it has a value already; returns the value it has now.
    fn create_or_get(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError>;
    /// From now on, commit only while the backend's own `key` has creation `revision` (the
    /// election key of a leading head). Backends one head owns alone ignore it.
    fn fence(&self, key: &[u8], revision: i64) {
        let _ = (key, revision);
    }
    /// Keeps (`on`) or drops a copy of every object, fed by the store's watch, that scans read
    /// while it is kept: a head that may lead one day loads the cluster from it. Backends one
    /// head owns alone ignore it.
    fn mirror(&self, on: bool) {
        let _ = on;
    }
    /// From now on (this head leads), every `every`, drops the store's history up to where
    /// it stood the last time. Backends that keep no history ignore it.
    fn compact_every(&self, every: Duration) {
        let _ = every;
    }
}

/// Which backend a head uses: `etcd://host:port,host:port[/prefix]`, or empty for the
/// embedded store in the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Embedded(std::path::PathBuf),
    Etcd { endpoints: Vec<String>, prefix: String },
}

impl Location {
    /// Parses a `--store` value; `state_dir` holds the embedded store.
    pub fn parse(spec: &str, state_dir: &Path) -> Result<Location, String> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Ok(Location::Embedded(state_dir.join("store.redb")));
        }
        let Some(rest) = spec.strip_prefix("etcd://") else {
            return Err(format!(
                "store {spec:?}: write etcd://host:port[,host:port...][/prefix], or nothing for the embedded store"
            ));
        };
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) => (h, format!("/{}", p.trim_matches('/'))),
            None => (rest, "/clusterfs".to_string()),
        };
        if prefix == "/" {
            return Err(format!("store {spec:?}: the prefix must not be empty"));
        }
        let mut endpoints = Vec::new();
        for host in hosts.split(',') {
            let (name, port) = host.rsplit_once(':').ok_or_else(|| format!("store {spec:?}: {host:?} has no :port"))?;
            if name.is_empty() || port.parse::<u16>().is_err() {
                return Err(format!("store {spec:?}: {host:?} is not host:port"));
            }
            endpoints.push(format!("http://{host}"));
        }
        Ok(Location::Etcd { endpoints, prefix })
    }
}

/// Durable objects of the cluster model.
#[derive(Debug)]
pub struct Store {
    backend: Box<dyn Backend>,
    queue: Mutex<Queue>,
    committed: Condvar,
}

/// One change: a key and its new value, or none to delete it.
pub type Change = (String, Option<Vec<u8>>);

/// Keys with their stored values, in key order.
pub type Objects = Vec<(String, Vec<u8>)>;

/// The longest a commit waits for the writers of the last one to come back.
const MAX_GATHER: Duration = Duration::from_millis(5);
/// Commits faster than this do not wait for writers: waiting would cost about what sharing
/// saves (a local fdatasync), while a commit over the network (etcd's quorum write) is worth
/// sharing.
const GATHER_ABOVE: Duration = Duration::from_millis(1);

/// Writes waiting for a commit. Batches are numbered; a writer's batch is the open one when
/// it queued, and it returns once `done` has passed it.
#[derive(Debug, Default)]
struct Queue {
    /// Each writer's changes, a group each.
    groups: Vec<Vec<Change>>,
    open: u64,
    done: u64,
    committing: bool,
    /// Writers waiting for the open batch (not those that only queued changes for it).
    joined: usize,
    /// Set while the next commit waits for writers to join it: each one is told.
    gathering: bool,
    /// The last commit: how many writers to expect for the next one (those that waited for
    /// it, and those that queued during it), and how long it took.
    last: (usize, Duration),
    /// The batches whose commit failed lately, with why.
    failed: VecDeque<(u64, StoreError)>,
}

impl Store {
    /// Opens (or creates) the embedded store; a damaged file is an error, never silently replaced.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store::with(Box::new(embedded::Embedded::open(path)?)))
    }

    /// Opens the store at `location`; an etcd cluster must answer now.
    pub fn open_at(location: &Location) -> Result<Store, StoreError> {
        match location {
            Location::Embedded(path) => Store::open(path),
            Location::Etcd { endpoints, prefix } => Ok(Store::with(Box::new(etcd::Etcd::connect(endpoints, prefix)?))),
        }
    }

    fn with(backend: Box<dyn Backend>) -> Store {
        Store { backend, queue: Mutex::default(), committed: Condvar::new() }
    }

    pub fn put<T: Serialize>(&self, kind: &str, name: &str, value: &T) -> Result<(), StoreError> {
        self.write(vec![Store::change(kind, name, value)?])
    }

    /// Setting `kind/name` to `value`, for `write`.
    pub fn change<T: Serialize>(kind: &str, name: &str, value: &T) -> Result<Change, StoreError> {
        Ok((format!("{kind}/{name}"), Some(serde_json::to_vec(value).map_err(db)?)))
    }

    pub fn delete(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        self.write(vec![(format!("{kind}/{name}"), None)])
    }

    /// Queues `changes` and returns once they are committed (all or none), leading the commit
    /// when none is under way.
    pub fn write(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        self.wait(self.write_later(changes))
    }

    /// Queues `changes` for the next commit and returns at once with a ticket for `wait`.
    /// Readers of the store do not see them before that commit; a later `write` commits them.
    pub fn write_later(&self, changes: Vec<Change>) -> u64 {
        let mut q = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !changes.is_empty() {
            q.groups.push(changes);
        }
        q.open
    }

    /// Returns once the changes queued with `ticket` are committed, leading the commit when
    /// none is under way.
    pub fn wait(&self, mine: u64) -> Result<(), StoreError> {
        let lock = || self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut q = lock();
        if mine == q.open {
            q.joined += 1;
            if q.gathering {
                self.committed.notify_all();
            }
        }
        loop {
            if q.done > mine {
                return match q.failed.iter().find(|f| f.0 == mine) {
                    Some((_, StoreError::Unavailable(why))) => Err(StoreError::Unavailable(why.clone())),
                    Some((_, other)) => Err(StoreError::Db(other.to_string())),
                    None => Ok(()),
                };
            }
            if q.committing {
                q = self.committed.wait(q).unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            q.committing = true;
            q = self.gather(q);
            let batch = std::mem::take(&mut q.groups);
            let writers = std::mem::take(&mut q.joined);
            let number = q.open;
            q.open += 1;
            drop(q);
            let started = Instant::now();
            let result = if batch.is_empty() { Ok(()) } else { self.backend.commit(&batch) };
            q = lock();
            q.last = (writers + q.joined, started.elapsed());
            q.committing = false;
            q.done = number + 1;
            if let Err(e) = result {
                tracing::warn!(batch = number, writers = batch.len(), error = %e, "a store commit failed");
                q.failed.push_back((number, e));
                if q.failed.len() > 64 {
                    q.failed.pop_front();
                }
            }
            self.committed.notify_all();
        }
    }

    /// Waits a little for the writers of the last commit before committing fewer: writers
    /// that were answered together come back about together, and the first back would
    /// otherwise commit alone while the others wait for it, then commit after it (a commit
    /// carrying one, the next the rest). Those that queued during the last commit are waited
    /// with, not counted as its writers: otherwise two halves of the writers would take turns
    /// for good, each committing without the other. It waits at most as long as the last
    /// commit took (`MAX_GATHER` at most), and not at all for a lone writer or after a fast
    /// commit.
    fn gather<'a>(&self, mut q: std::sync::MutexGuard<'a, Queue>) -> std::sync::MutexGuard<'a, Queue> {
        let (all, took) = q.last;
        if q.groups.is_empty() || q.joined >= all || took < GATHER_ABOVE {
            return q;
        }
        let deadline = Instant::now() + took.min(MAX_GATHER);
        q.gathering = true;
        while q.joined < all {
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                break;
            };
            q = self.committed.wait_timeout(q, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
        q.gathering = false;
        q
    }

    /// Every object of `kind`, by name.
    pub fn scan<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<(String, T)>, StoreError> {
        let prefix = format!("{kind}/");
        let mut out = Vec::new();
        for (key, value) in self.backend.scan(&prefix)? {
            let value = serde_json::from_slice(&value)
                .map_err(|e| StoreError::Decode { key: key.clone(), message: e.to_string() })?;
            out.push((key[prefix.len()..].to_string(), value));
        }
        Ok(out)
    }

    /// Every object of every kind, as stored: for `clusterfs store copy`.
    pub fn all(&self) -> Result<Objects, StoreError> {
        self.backend.scan("")
    }

    /// Keeps or drops a copy of the store fed by its watch (see `Backend::mirror`).
    pub fn mirror(&self, on: bool) {
        self.backend.mirror(on);
    }

    /// Drops the store's history now and then while this head leads (see `Backend::compact_every`).
    pub fn compact_every(&self, every: Duration) {
        self.backend.compact_every(every);
    }

    /// Commits only while the leading head's election key stands (see `Backend::fence`).
    pub fn fence(&self, key: &[u8], revision: i64) {
        self.backend.fence(key, revision);
    }

    /// `kind/name`'s value, set to `value` first if it has none: the first head to start
    /// decides, every other takes what it decided.
    pub fn create_or_get(&self, kind: &str, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.backend.create_or_get(&format!("{kind}/{name}"), value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_survive_reopen_and_scan_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let s = Store::open(&path).unwrap();
            s.put("nodes", "cn1", &"a").unwrap();
            s.put("nodes", "cn2", &"b").unwrap();
            s.put("groups", "g", &"c").unwrap();
            s.delete("nodes", "cn2").unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.scan::<String>("nodes").unwrap(), vec![("cn1".to_string(), "a".to_string())]);
        assert_eq!(s.scan::<String>("groups").unwrap().len(), 1);
    }

    /// `writers` threads, each putting `each` jobs one after the other (`think` between two,
    /// as a writer's way back through the kernel takes), then deleting its first; the second
    /// half of them starts `stagger` after the first. Returns when all are done.
    fn write_at_once(store: &std::sync::Arc<Store>, writers: u32, each: u32, (stagger, think): (Duration, Duration)) {
        let threads: Vec<_> = (0..writers)
            .map(|t| {
                let s = store.clone();
                if t == writers / 2 {
                    std::thread::sleep(stagger);
                }
                std::thread::spawn(move || {
                    for i in 0..each {
                        s.put("jobs", &format!("{t}-{i}"), &i).unwrap();
                        std::thread::sleep(think);
                    }
                    s.delete("jobs", &format!("{t}-0")).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn concurrent_writers_share_commits_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        write_at_once(&std::sync::Arc::new(Store::open(&path).unwrap()), 8, 50, (Duration::ZERO, Duration::ZERO));
        let s = Store::open(&path).unwrap();
        assert_eq!(s.scan::<u32>("jobs").unwrap().len(), 8 * 49);
    }

    /// A store whose every commit takes 5 ms, as a quorum write over the network does.
    #[derive(Debug, Default)]
    struct Slow {
        commits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Backend for Slow {
        fn commit(&self, _groups: &[Vec<Change>]) -> Result<(), StoreError> {
            std::thread::sleep(Duration::from_millis(5));
            self.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        fn scan(&self, _prefix: &str) -> Result<Objects, StoreError> {
            Ok(Vec::new())
        }
        fn create_or_get(&self, _key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
            Ok(value.to_vec())
        }
    }

    #[test]
    fn writers_answered_together_share_the_next_slow_commit_too() {
        let slow = Slow::default();
        let commits = slow.commits.clone();
        // Four writers, each writing again as soon as it is answered: 204 writes. Without
        // waiting for each other, the first back commits alone and the three others after
        // it, about two writes a commit (92-95 commits when tried); together, about four.
        write_at_once(&std::sync::Arc::new(Store::with(Box::new(slow))), 4, 50, (Duration::ZERO, Duration::ZERO));
        let commits = commits.load(std::sync::atomic::Ordering::Relaxed);
        assert!(commits <= 75, "204 writes of 4 writers took {commits} commits");
    }

    #[test]
    fn writers_that_queued_during_a_slow_commit_wait_for_its_writers_too() {
        let slow = Slow::default();
        let commits = slow.commits.clone();
        // The second writer starts while the first one's commit is under way, and each takes
        // 1 ms to come back. If the second then committed as soon as it had as many writers as
        // that commit (itself), the two would take turns for good, each write a commit of its
        // own: about 102 commits for 102 writes.
        let pace = (Duration::from_millis(1), Duration::from_millis(1));
        write_at_once(&std::sync::Arc::new(Store::with(Box::new(slow))), 2, 50, pace);
        let commits = commits.load(std::sync::atomic::Ordering::Relaxed);
        assert!(commits <= 70, "102 writes of 2 writers took {commits} commits");
    }

    #[test]
    fn store_locations_parse_or_say_why() {
        let state = Path::new("/var/lib/clusterfs");
        assert_eq!(Location::parse("", state), Ok(Location::Embedded(state.join("store.redb"))));
        let etcd = |eps: &[&str], prefix: &str| Location::Etcd {
            endpoints: eps.iter().map(|e| format!("http://{e}")).collect(),
            prefix: prefix.into(),
        };
        assert_eq!(Location::parse("etcd://e1:2379,e2:2379", state), Ok(etcd(&["e1:2379", "e2:2379"], "/clusterfs")));
        assert_eq!(Location::parse("etcd://e1:2379/site/a/", state), Ok(etcd(&["e1:2379"], "/site/a")));
        assert!(Location::parse("etcd://e1", state).unwrap_err().contains("no :port"));
        assert!(Location::parse("etcd://e1:http", state).unwrap_err().contains("not host:port"));
        assert!(Location::parse("etcd://e1:2379/", state).unwrap_err().contains("prefix"));
        assert!(Location::parse("redis://x:1", state).unwrap_err().contains("etcd://"));
    }

    #[test]
    fn a_corrupt_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        assert!(matches!(Store::open(&path), Err(StoreError::Open { .. })));
    }

    #[test]
    fn a_store_another_head_holds_is_said_to_be_in_use_not_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let _first = Store::open(&path).unwrap();
        let e = Store::open(&path).unwrap_err();
        assert!(matches!(e, StoreError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("in use by another process") && !e.to_string().contains("move it away"), "{e}");
    }
}
