//! The embedded store: one redb file of JSON objects under `kind/name` keys, with group commit.
//!
//! Each object is one key, so the layout maps one-to-one onto an etcd keyspace. Every write is
//! durable when it returns; writes that arrive while a commit is under way are committed
//! together by the next one (one fsync for all), so concurrent writers do not queue for a
//! commit each.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Condvar, Mutex};

use redb::{Database, ReadableDatabase, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {message} (refusing to start on a store that cannot be read; restore it or move it away)")]
    Open { path: String, message: String },
    #[error("store: {0}")]
    Db(String),
    #[error("store object {key}: {message}")]
    Decode { key: String, message: String },
}

impl StoreError {
    /// Whether the state directory's disk is full (ENOSPC from the file system).
    pub fn is_full(&self) -> bool {
        let text = self.to_string();
        text.contains("os error 28") || text.contains("No space left on device")
    }
}

impl From<StoreError> for clusterfs_fs::FsError {
    /// What a caller of the tree gets: ENOSPC when the head's disk is full, EIO otherwise.
    fn from(e: StoreError) -> clusterfs_fs::FsError {
        let errno = if e.is_full() { clusterfs_fs::Errno::NoSpc } else { clusterfs_fs::Errno::Io };
        clusterfs_fs::FsError::new(errno, format!("the store failed: {e}"))
    }
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Durable objects of the cluster model.
#[derive(Debug)]
pub struct Store {
    /// None after a failed commit: redb refuses all work after an I/O error until reopened,
    /// so the next use opens it again (which repairs it), once the disk allows.
    db: std::sync::RwLock<Option<Database>>,
    path: std::path::PathBuf,
    queue: Mutex<Queue>,
    committed: Condvar,
}

/// One change: a key and its new value, or none to delete it.
pub type Change = (String, Option<Vec<u8>>);

/// Writes waiting for a commit. Batches are numbered; a writer's batch is the open one when
/// it queued, and it returns once `done` has passed it.
#[derive(Debug, Default)]
struct Queue {
    changes: Vec<Change>,
    open: u64,
    done: u64,
    committing: bool,
    /// The batches whose commit failed lately, with why.
    failed: VecDeque<(u64, String)>,
}

impl Store {
    /// Opens (or creates) the store; a damaged file is an error, never silently replaced.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open =
            |e: &dyn std::fmt::Display| StoreError::Open { path: path.display().to_string(), message: e.to_string() };
        let db = Store::open_db(path).map_err(|e| open(&e))?;
        let txn = db.begin_write().map_err(|e| open(&e))?;
        txn.open_table(OBJECTS).map_err(|e| open(&e))?;
        txn.commit().map_err(|e| open(&e))?;
        Ok(Store {
            db: std::sync::RwLock::new(Some(db)),
            path: path.to_path_buf(),
            queue: Mutex::default(),
            committed: Condvar::new(),
        })
    }

    /// Opens the file without ever damaging it further: a clean store opens as it is; one left
    /// by a crash is repaired from a copy kept until the repair succeeds (a failed repair puts
    /// the file back as it was); anything else is refused untouched.
    fn open_db(path: &Path) -> Result<Database, String> {
        if !path.exists() {
            return Database::create(path).map_err(|e| e.to_string());
        }
        match redb::Builder::new().open_read_only(path) {
            Ok(ro) => drop(ro),
            Err(redb::DatabaseError::RepairAborted) => {
                let copy = path.with_extension("redb.before-repair");
                std::fs::copy(path, &copy).map_err(|e| format!("keeping a copy before its repair: {e}"))?;
                tracing::warn!(path = %path.display(), "the store was not closed cleanly: repairing it");
                return match Database::create(path) {
                    Ok(db) => {
                        let _ = std::fs::remove_file(&copy);
                        Ok(db)
                    }
                    Err(e) => {
                        // The repair failed: the file goes back to what it was.
                        let _ = std::fs::rename(&copy, path);
                        Err(format!("its repair failed: {e}"))
                    }
                };
            }
            Err(e) => return Err(e.to_string()),
        }
        Database::create(path).map_err(|e| e.to_string())
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
        q.changes.extend(changes);
        q.open
    }

    /// Returns once the changes queued with `ticket` are committed, leading the commit when
    /// none is under way.
    pub fn wait(&self, mine: u64) -> Result<(), StoreError> {
        let lock = || self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut q = lock();
        loop {
            if q.done > mine {
                return match q.failed.iter().find(|f| f.0 == mine) {
                    Some((_, why)) => Err(StoreError::Db(why.clone())),
                    None => Ok(()),
                };
            }
            if q.committing {
                q = self.committed.wait(q).unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            let batch = std::mem::take(&mut q.changes);
            let number = q.open;
            q.open += 1;
            q.committing = true;
            drop(q);
            let result = self.commit(&batch);
            q = lock();
            q.committing = false;
            q.done = number + 1;
            if let Err(e) = result {
                let why = match e {
                    StoreError::Db(why) => why,
                    other => other.to_string(),
                };
                q.failed.push_back((number, why));
                if q.failed.len() > 64 {
                    q.failed.pop_front();
                }
            }
            self.committed.notify_all();
        }
    }

    /// Runs `f` on the database, opening it again first if a failed commit closed it.
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        {
            let guard = self.db.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(d) = guard.as_ref() {
                return f(d);
            }
        }
        let mut guard = self.db.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.is_none() {
            *guard = Some(Database::create(&self.path).map_err(db)?);
            tracing::info!(path = %self.path.display(), "the store is open again after a failed commit");
        }
        f(guard.as_ref().expect("opened above"))
    }

    fn commit(&self, batch: &[Change]) -> Result<(), StoreError> {
        let result = self.with_db(|d| Store::commit_in(d, batch));
        if result.is_err() {
            // redb takes no more writes after an I/O error (a full disk): close it now, so the
            // next commit reopens it once there is room again.
            *self.db.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
        result
    }

    fn commit_in(d: &Database, batch: &[Change]) -> Result<(), StoreError> {
        let txn = d.begin_write().map_err(db)?;
        {
            let mut table = txn.open_table(OBJECTS).map_err(db)?;
            for (key, value) in batch {
                match value {
                    Some(v) => table.insert(key.as_str(), v.as_slice()).map_err(db)?,
                    None => table.remove(key.as_str()).map_err(db)?,
                };
            }
        }
        txn.commit().map_err(db)
    }

    /// Every object of `kind`, by name.
    pub fn scan<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<(String, T)>, StoreError> {
        let prefix = format!("{kind}/");
        self.with_db(|d| Store::scan_in(d, &prefix))
    }

    fn scan_in<T: DeserializeOwned>(d: &Database, prefix: &str) -> Result<Vec<(String, T)>, StoreError> {
        let txn = d.begin_read().map_err(db)?;
        let table = txn.open_table(OBJECTS).map_err(db)?;
        let mut out = Vec::new();
        for item in table.range(prefix..).map_err(db)? {
            let (k, v) = item.map_err(db)?;
            let key = k.value();
            let Some(name) = key.strip_prefix(prefix) else { break };
            let value = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Decode { key: key.to_string(), message: e.to_string() })?;
            out.push((name.to_string(), value));
        }
        Ok(out)
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

    #[test]
    fn concurrent_writers_share_commits_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let s = std::sync::Arc::new(Store::open(&path).unwrap());
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        for i in 0..50 {
                            s.put("jobs", &format!("{t}-{i}"), &i).unwrap();
                        }
                        s.delete("jobs", &format!("{t}-0")).unwrap();
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.scan::<u32>("jobs").unwrap().len(), 8 * 49);
    }

    #[test]
    fn a_corrupt_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        assert!(matches!(Store::open(&path), Err(StoreError::Open { .. })));
    }
}
