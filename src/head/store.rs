//! The embedded store: one redb file of JSON objects under `kind/name` keys.
//!
//! Each object is one key, so the layout maps one-to-one onto an etcd keyspace.

use std::path::Path;

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

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Durable objects of the cluster model.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the store; a damaged file is an error, never silently replaced.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open =
            |e: &dyn std::fmt::Display| StoreError::Open { path: path.display().to_string(), message: e.to_string() };
        let db = Database::create(path).map_err(|e| open(&e))?;
        let txn = db.begin_write().map_err(|e| open(&e))?;
        txn.open_table(OBJECTS).map_err(|e| open(&e))?;
        txn.commit().map_err(|e| open(&e))?;
        Ok(Store { db })
    }

    pub fn put<T: Serialize>(&self, kind: &str, name: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(db)?;
        let key = format!("{kind}/{name}");
        let txn = self.db.begin_write().map_err(db)?;
        txn.open_table(OBJECTS).map_err(db)?.insert(key.as_str(), bytes.as_slice()).map_err(db)?;
        txn.commit().map_err(db)
    }

    pub fn delete(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        let key = format!("{kind}/{name}");
        let txn = self.db.begin_write().map_err(db)?;
        txn.open_table(OBJECTS).map_err(db)?.remove(key.as_str()).map_err(db)?;
        txn.commit().map_err(db)
    }

    /// Every object of `kind`, by name.
    pub fn scan<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<(String, T)>, StoreError> {
        let prefix = format!("{kind}/");
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(OBJECTS).map_err(db)?;
        let mut out = Vec::new();
        for item in table.range(prefix.as_str()..).map_err(db)? {
            let (k, v) = item.map_err(db)?;
            let key = k.value();
            let Some(name) = key.strip_prefix(&prefix) else { break };
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
    fn a_corrupt_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        assert!(matches!(Store::open(&path), Err(StoreError::Open { .. })));
    }
}
