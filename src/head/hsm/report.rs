//! Report files `hsm/<hint>`: append-only line logs in the spool, removed one interval after their last request.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tracing::warn;

/// One report file.
#[derive(Debug)]
struct Hint {
    file: File,
    len: u64,
    mtime: SystemTime,
    /// Requests with this hint not ended yet.
    active: u64,
    idle_since: Option<Instant>,
    generation: u64,
}

/// Every report file, by hint.
#[derive(Debug)]
pub struct Reports {
    dir: PathBuf,
    interval: Duration,
    hints: Mutex<HashMap<String, Hint>>,
    generations: std::sync::atomic::AtomicU64,
}

/// What `stat` shows of a report file.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub len: u64,
    pub mtime: SystemTime,
    pub generation: u64,
}

impl Reports {
    /// Opens the report directory. Files left by an earlier run stay for `active` hints
    /// (requests that survived the restart) and go one interval from now otherwise.
    pub fn open(dir: PathBuf, interval: Duration, active: &HashMap<String, u64>) -> std::io::Result<Reports> {
        std::fs::create_dir_all(&dir)?;
        let generation = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let reports = Reports {
            dir,
            interval,
            hints: Mutex::default(),
            generations: std::sync::atomic::AtomicU64::new(generation),
        };
        let mut hints = reports.lock();
        for entry in std::fs::read_dir(&reports.dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            if !crate::hsm::valid_hint(&name) {
                continue;
            }
            let file = OpenOptions::new().append(true).read(true).open(entry.path())?;
            let meta = file.metadata()?;
            let n = active.get(&name).copied().unwrap_or(0);
            hints.insert(
                name,
                Hint {
                    file,
                    len: meta.len(),
                    mtime: meta.modified().unwrap_or_else(|_| SystemTime::now()),
                    active: n,
                    idle_since: (n == 0).then(Instant::now),
                    generation: reports.generations.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                },
            );
        }
        drop(hints);
        Ok(reports)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Hint>> {
        self.hints.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request with `hint` began: its file exists from now on.
    pub fn begin(&self, hint: &str) {
        let mut hints = self.lock();
        if let Some(h) = hints.get_mut(hint) {
            h.active += 1;
            h.idle_since = None;
            return;
        }
        let path = self.dir.join(hint);
        let opened = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path);
        match opened {
            Ok(file) => {
                let generation = self.generations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                hints.insert(
                    hint.to_string(),
                    Hint { file, len: 0, mtime: SystemTime::now(), active: 1, idle_since: None, generation },
                );
            }
            Err(e) => warn!(hint, error = %e, "cannot make the report file"),
        }
    }

    /// A request with `hint` ended.
    pub fn end(&self, hint: &str) {
        if let Some(h) = self.lock().get_mut(hint) {
            h.active = h.active.saturating_sub(1);
            if h.active == 0 {
                h.idle_since = Some(Instant::now());
            }
        }
    }

    /// Appends `line` and its newline to `hint`'s file.
    pub fn line(&self, hint: &str, line: &str) {
        let mut hints = self.lock();
        let Some(h) = hints.get_mut(hint) else { return };
        let text = format!("{line}\n");
        match h.file.write_all(text.as_bytes()) {
            Ok(()) => {
                h.len += text.len() as u64;
                h.mtime = SystemTime::now();
            }
            Err(e) => warn!(hint, error = %e, "cannot write the report file"),
        }
    }

    /// Removes the files idle for a whole interval.
    pub fn sweep(&self) {
        let mut hints = self.lock();
        let gone: Vec<String> = hints
            .iter()
            .filter(|(_, h)| h.idle_since.is_some_and(|t| t.elapsed() >= self.interval))
            .map(|(k, _)| k.clone())
            .collect();
        for hint in gone {
            hints.remove(&hint);
            if let Err(e) = std::fs::remove_file(self.dir.join(&hint)) {
                warn!(hint, error = %e, "cannot remove the report file");
            }
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }

    pub fn meta(&self, hint: &str) -> Option<Meta> {
        self.lock().get(hint).map(|h| Meta { len: h.len, mtime: h.mtime, generation: h.generation })
    }

    /// Up to `size` bytes of `hint`'s file from `offset`.
    pub fn read(&self, hint: &str, offset: u64, size: u32) -> Option<std::io::Result<Vec<u8>>> {
        let hints = self.lock();
        let h = hints.get(hint)?;
        let want = h.len.saturating_sub(offset).min(u64::from(size)) as usize;
        let mut buf = vec![0; want];
        Some(h.file.read_exact_at(&mut buf, offset).map(|()| buf))
    }
}
