//! The embedded backend: one redb file in the head's state directory.

use std::path::{Path, PathBuf};
use std::sync::RwLock;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Backend, Change, Objects, StoreError, db};

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");

#[derive(Debug)]
pub struct Embedded {
    /// None after a failed commit: redb refuses all work after an I/O error until reopened,
    /// so the next use opens it again (which repairs it), once the disk allows.
    db: RwLock<Option<Database>>,
    path: PathBuf,
}

impl Embedded {
    /// Opens (or creates) the file; a damaged file is an error, never silently replaced.
    pub fn open(path: &Path) -> Result<Embedded, StoreError> {
        let open =
            |e: &dyn std::fmt::Display| StoreError::Open { path: path.display().to_string(), message: e.to_string() };
        let db = open_db(path).map_err(|e| match e {
            OpenError::InUse => StoreError::InUse { path: path.display().to_string() },
            OpenError::Other(why) => open(&why),
        })?;
        let txn = db.begin_write().map_err(|e| open(&e))?;
        txn.open_table(OBJECTS).map_err(|e| open(&e))?;
        txn.commit().map_err(|e| open(&e))?;
        Ok(Embedded { db: RwLock::new(Some(db)), path: path.to_path_buf() })
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

    /// Runs a write transaction; a failure closes the database (see `db`).
    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let result = self.with_db(|d| {
            let txn = d.begin_write().map_err(db)?;
            let out = f(&txn)?;
            txn.commit().map_err(db)?;
            Ok(out)
        });
        if result.is_err() {
            // redb takes no more writes after an I/O error (a full disk): close it now, so the
            // next commit reopens it once there is room again.
            *self.db.write().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
        result
    }
}

impl Backend for Embedded {
    /// All groups in one transaction: one fsync for the batch.
    fn commit(&self, groups: &[Vec<Change>]) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(OBJECTS).map_err(db)?;
            for (key, value) in groups.iter().flatten() {
                match value {
                    Some(v) => table.insert(key.as_str(), v.as_slice()).map_err(db)?,
                    None => table.remove(key.as_str()).map_err(db)?,
                };
            }
            Ok(())
        })
    }

    fn scan(&self, prefix: &str) -> Result<Objects, StoreError> {
        self.with_db(|d| {
            let txn = d.begin_read().map_err(db)?;
            let table = txn.open_table(OBJECTS).map_err(db)?;
            let mut out = Vec::new();
            for item in table.range(prefix..).map_err(db)? {
                let (k, v) = item.map_err(db)?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                out.push((k.value().to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    fn create_or_get(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(OBJECTS).map_err(db)?;
            if let Some(have) = table.get(key).map_err(db)? {
                return Ok(have.value().to_vec());
            }
            table.insert(key, value).map_err(db)?;
            Ok(value.to_vec())
        })
    }
}

/// Opens the file without ever damaging it further: a clean store opens as it is; one left
/// by a crash is repaired from a copy kept until the repair succeeds (a failed repair puts
/// the file back as it was); anything else is refused untouched.
/// Why a store file could not be opened.
enum OpenError {
    /// Another process holds it: nothing is wrong with the file.
    InUse,
    Other(String),
}

impl From<redb::DatabaseError> for OpenError {
    fn from(e: redb::DatabaseError) -> OpenError {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen => OpenError::InUse,
            other => OpenError::Other(other.to_string()),
        }
    }
}

impl From<String> for OpenError {
    fn from(why: String) -> OpenError {
        OpenError::Other(why)
    }
}

fn open_db(path: &Path) -> Result<Database, OpenError> {
    if !path.exists() {
        return Ok(Database::create(path)?);
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
                    Err(OpenError::Other(format!("its repair failed: {e}")))
                }
            };
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Database::create(path)?)
}
