//! Inode numbers derived from paths: the same object gets the same number after a restart and on every head.

use std::sync::Arc;

use dashmap::DashMap;
use xxhash_rust::xxh3::xxh3_64_with_seed;

pub const ROOT: u64 = 1;
/// Numbers below this are kept for the root and readdir cookies of `.` and `..`.
const FIRST: u64 = 16;

/// A path below the mount root, as owned components.
pub type PathBuf = Arc<[String]>;

/// Maps inode numbers to paths and back. Entries are never removed, so a number is never
/// reused for another path while the process lives; after a restart, the same paths hash
/// to the same numbers again.
#[derive(Debug, Default)]
pub struct Inodes {
    by_ino: DashMap<u64, PathBuf>,
}

impl Inodes {
    pub fn new() -> Inodes {
        let inodes = Inodes::default();
        inodes.by_ino.insert(ROOT, Arc::from(Vec::new()));
        inodes
    }

    /// The number of `path`, recording it for the way back.
    pub fn ino(&self, path: &[String]) -> u64 {
        if path.is_empty() {
            return ROOT;
        }
        let mut seed = 0u64;
        loop {
            let ino = hash(path, seed);
            match self.by_ino.entry(ino) {
                dashmap::Entry::Occupied(e) if *e.get().as_ref() == *path => return ino,
                // A different path owns this number: probe with the next seed (deterministic).
                dashmap::Entry::Occupied(_) => seed += 1,
                dashmap::Entry::Vacant(v) => {
                    v.insert(Arc::from(path.to_vec()));
                    return ino;
                }
            }
        }
    }

    /// The path of a number handed out by this process.
    pub fn path(&self, ino: u64) -> Option<PathBuf> {
        self.by_ino.get(&ino).map(|p| p.clone())
    }

    /// Whether `path` hashes to `ino` (used to find numbers from before a restart).
    pub fn matches(path: &[String], ino: u64) -> bool {
        (0..4).any(|seed| hash(path, seed) == ino)
    }
}

fn hash(path: &[String], seed: u64) -> u64 {
    let joined = path.join("/");
    // Keep numbers positive as i64 (readdir cookies are offsets) and clear of the reserved ones.
    let h = xxh3_64_with_seed(joined.as_bytes(), seed) & (i64::MAX as u64);
    if h < FIRST { h + FIRST } else { h }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn numbers_are_stable_and_reversible() {
        let a = Inodes::new();
        let b = Inodes::new();
        let path = p(&["nodes", "cn1", "sitrep"]);
        let ino = a.ino(&path);
        assert_eq!(ino, b.ino(&path), "a second process derives the same number");
        assert!(ino >= FIRST && ino <= i64::MAX as u64);
        assert_eq!(a.path(ino).unwrap().as_ref(), path.as_slice());
        assert_eq!(a.ino(&[]), ROOT);
        assert!(Inodes::matches(&path, ino));
        assert_ne!(a.ino(&p(&["nodes", "cn2", "sitrep"])), ino);
    }
}
