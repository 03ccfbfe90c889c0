//! The book behind every `error` file: each caller's last failure in each directory.

use dashmap::DashMap;

use crate::error::FsError;
use crate::inodes::PathBuf;

/// Last failure per (directory, uid). Bounded: the oldest half is dropped past `MAX`.
#[derive(Debug, Default)]
pub struct ErrorBook {
    last: DashMap<(PathBuf, u32), (u64, String)>,
    seq: std::sync::atomic::AtomicU64,
}

const MAX: usize = 65_536;

impl ErrorBook {
    pub fn record(&self, dir: PathBuf, uid: u32, error: &FsError) {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.last.len() >= MAX {
            let cutoff = seq.saturating_sub(MAX as u64 / 2);
            self.last.retain(|_, (s, _)| *s >= cutoff);
        }
        self.last.insert((dir, uid), (seq, format!("{error}\n")));
    }

    /// What `dir/error` shows to `uid`: its last failure there, or nothing.
    pub fn render(&self, dir: &PathBuf, uid: u32) -> Vec<u8> {
        self.last.get(&(dir.clone(), uid)).map(|e| e.1.clone().into_bytes()).unwrap_or_default()
    }
}
