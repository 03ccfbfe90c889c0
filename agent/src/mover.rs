//! The HSM mover role: runs archive, restore and remove requests with the POSIX backend or an external command.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clusterfs::hsm::{Action, Held, MoverInfo, Request};
use clusterfs::proto::Message;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// How a mover is set up (the same for every node name of the agent).
#[derive(Debug, Clone)]
pub struct MoverConfig {
    pub info: MoverInfo,
    /// The Lustre mount: files are opened as `<lustre_root>/.lustre/fid/<fid>`.
    pub lustre_root: PathBuf,
    /// Where archive copies go, keyed by fid; `%n` is the node name.
    pub archive_root: PathBuf,
    /// Instead of the POSIX backend: `sh -c <command>` with the request in `CLUSTER_HSM_*`.
    pub command: Option<String>,
    /// Requests copied at once.
    pub threads: usize,
}

/// Where one request stands.
#[derive(Debug)]
struct Item {
    req: Request,
    bytes: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    cancel: Arc<AtomicBool>,
    /// The external command's process group, while it runs.
    pgid: Arc<AtomicI32>,
    status: Option<i32>,
    /// What this connection has told the head.
    told_bytes: u64,
    told_done: bool,
}

/// One node name's mover.
#[derive(Debug)]
pub struct Mover {
    cfg: MoverConfig,
    archive_root: PathBuf,
    items: Mutex<HashMap<u64, Item>>,
    limit: Arc<Semaphore>,
    /// Cancels that came before their request (both travel separately): bounded.
    early_cancels: Mutex<std::collections::VecDeque<u64>>,
}

/// Every mover of this process, for [`interrupt_all`].
static ALL: Mutex<Vec<std::sync::Weak<Mover>>> = Mutex::new(Vec::new());

/// A stopping agent stops what its movers run: its connections are gone, so an end it waited
/// for could not be told, and the head gives those requests to a mover again (at once when
/// this one reconnects holding nothing). Waiting would hold the stop for as long as a copy runs.
pub fn interrupt_all() {
    let all = ALL.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    for mover in all.iter().filter_map(std::sync::Weak::upgrade) {
        let items = mover.lock();
        let running: Vec<u64> = items.values().filter(|i| i.status.is_none()).map(|i| i.req.cookie).collect();
        drop(items);
        if !running.is_empty() {
            tracing::info!(requests = running.len(), "stopping: interrupting the HSM requests under way");
        }
        for cookie in running {
            mover.cancel(cookie);
        }
    }
}

impl Mover {
    pub fn new(cfg: MoverConfig, node: &str) -> Arc<Mover> {
        let archive_root = PathBuf::from(cfg.archive_root.to_string_lossy().replace("%n", node));
        let limit = Arc::new(Semaphore::new(cfg.threads.max(1)));
        let mover =
            Arc::new(Mover { cfg, archive_root, items: Mutex::default(), limit, early_cancels: Mutex::default() });
        let mut all = ALL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|m| m.strong_count() > 0);
        all.push(Arc::downgrade(&mover));
        mover
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Item>> {
        self.items.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What to tell a head after connecting: what this mover is and what it holds. The new
    /// connection is told everything again.
    pub fn hello(&self) -> Message {
        let mut items = self.lock();
        let held = items
            .values_mut()
            .map(|i| {
                i.told_done = i.status.is_some();
                i.told_bytes = i.bytes.load(Ordering::Relaxed);
                Held {
                    cookie: i.req.cookie,
                    bytes: i.told_bytes,
                    total: i.total.load(Ordering::Relaxed),
                    status: i.status,
                }
            })
            .collect();
        Message::Mover { info: self.cfg.info.clone(), held }
    }

    /// Starts the requests it does not hold yet.
    pub fn start(self: &Arc<Self>, requests: Vec<Request>) {
        let mut items = self.lock();
        for req in requests {
            if items.contains_key(&req.cookie) {
                continue;
            }
            let item = Item {
                req: req.clone(),
                bytes: Arc::default(),
                total: Arc::default(),
                cancel: Arc::default(),
                pgid: Arc::default(),
                status: None,
                told_bytes: 0,
                told_done: false,
            };
            let job = Job {
                req,
                lustre_root: self.cfg.lustre_root.clone(),
                archive_root: self.archive_root.clone(),
                command: self.cfg.command.clone(),
                bytes: item.bytes.clone(),
                total: item.total.clone(),
                cancel: item.cancel.clone(),
                pgid: item.pgid.clone(),
            };
            let early = {
                let mut early = self.early_cancels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let at = early.iter().position(|c| *c == job.req.cookie);
                at.and_then(|i| early.remove(i)).is_some()
            };
            items.insert(job.req.cookie, item);
            if early {
                items.entry(job.req.cookie).and_modify(|i| i.status = Some(libc::ECANCELED));
                continue;
            }
            let me = self.clone();
            tokio::spawn(async move {
                let cookie = job.req.cookie;
                let permit = me.limit.clone().acquire_owned().await;
                let status = tokio::task::spawn_blocking(move || job.run()).await.unwrap_or(libc::EIO);
                drop(permit);
                if let Some(i) = me.lock().get_mut(&cookie) {
                    i.status = Some(status);
                }
            });
        }
    }

    /// Stops a request; it ends with ECANCELED.
    pub fn cancel(&self, cookie: u64) {
        let items = self.lock();
        let Some(i) = items.get(&cookie) else {
            let mut early = self.early_cancels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            early.push_back(cookie);
            if early.len() > 4096 {
                early.pop_front();
            }
            return;
        };
        i.cancel.store(true, Ordering::Relaxed);
        let pgid = i.pgid.load(Ordering::Relaxed);
        if pgid > 0 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// The head recorded these ends: forget them.
    pub fn ack(&self, cookies: &[u64]) {
        let mut items = self.lock();
        for c in cookies {
            if items.get(c).is_some_and(|i| i.status.is_some()) {
                items.remove(c);
            }
        }
    }

    /// What the head has not been told yet: progress of running requests, ends.
    pub fn news(&self) -> Vec<Message> {
        let mut out = Vec::new();
        for i in self.lock().values_mut() {
            let bytes = i.bytes.load(Ordering::Relaxed);
            if let Some(status) = i.status {
                if !i.told_done {
                    i.told_done = true;
                    out.push(Message::HsmDone { cookie: i.req.cookie, status });
                }
            } else if bytes != i.told_bytes {
                i.told_bytes = bytes;
                out.push(Message::HsmProgress { cookie: i.req.cookie, bytes, total: i.total.load(Ordering::Relaxed) });
            }
        }
        out
    }
}

/// One request on its way through a backend.
#[derive(Debug)]
struct Job {
    req: Request,
    lustre_root: PathBuf,
    archive_root: PathBuf,
    command: Option<String>,
    bytes: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    cancel: Arc<AtomicBool>,
    pgid: Arc<AtomicI32>,
}

/// An I/O error as the errno a copytool reports.
fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Job {
    /// Runs the request; 0 or a positive errno.
    fn run(self) -> i32 {
        let started = std::time::Instant::now();
        let result = match &self.command {
            Some(cmd) => self.command(cmd),
            None => self.posix(),
        };
        let status = match result {
            Ok(()) => 0,
            Err(_) if self.cancel.load(Ordering::Relaxed) => libc::ECANCELED,
            Err(e) => {
                warn!(cookie = self.req.cookie, fid = %self.req.fid, action = self.req.action.word(), error = %e, "hsm request failed");
                errno(&e)
            }
        };
        info!(cookie = self.req.cookie, fid = %self.req.fid, action = self.req.action.word(), status,
            bytes = self.bytes.load(Ordering::Relaxed), ms = started.elapsed().as_millis() as u64, "hsm request ended");
        status
    }

    fn fid_path(&self, fid: &clusterfs::hsm::Fid) -> PathBuf {
        self.lustre_root.join(".lustre/fid").join(fid.to_string())
    }

    /// The archive copy of this request's file, keyed by fid.
    fn archive_path(&self) -> PathBuf {
        let f = self.req.fid;
        self.archive_root.join(format!("{:#x}", f.seq)).join(format!("{:#x}:{:#x}:{:#x}", f.seq, f.oid, f.ver))
    }

    fn posix(&self) -> std::io::Result<()> {
        let archived = self.archive_path();
        match self.req.action {
            Action::Archive => {
                let src = File::open(self.fid_path(&self.req.fid))?;
                let meta = src.metadata()?;
                let dir = archived.parent().expect("an archive path has a directory");
                std::fs::create_dir_all(dir)?;
                let tmp = dir.join(format!(".{:x}.tmp", self.req.cookie));
                let result = (|| {
                    let mut dst = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
                    self.copy(src, &mut dst, meta.len())?;
                    dst.set_permissions(meta.permissions())?;
                    dst.set_modified(meta.modified()?)?;
                    dst.sync_all()?;
                    std::fs::rename(&tmp, &archived)
                })();
                if result.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                result
            }
            Action::Restore => {
                let src = File::open(&archived)?;
                let len = src.metadata()?.len();
                let mut dst = OpenOptions::new().write(true).truncate(true).open(self.fid_path(&self.req.dfid))?;
                self.copy(src, &mut dst, len)?;
                dst.sync_all()
            }
            Action::Remove => match std::fs::remove_file(&archived) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// Copies `len` bytes, counting them, stopping when canceled.
    fn copy(&self, mut src: File, dst: &mut File, len: u64) -> std::io::Result<()> {
        self.total.store(len, Ordering::Relaxed);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
            }
            let n = src.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            dst.write_all(&buf[..n])?;
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Runs the external command; its `progress <bytes> <total>` lines count, its exit status
    /// is the request's.
    fn command(&self, cmd: &str) -> std::io::Result<()> {
        let r = &self.req;
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(cmd)
            .env("CLUSTER_HSM_ACTION", r.action.word())
            .env("CLUSTER_HSM_FID", r.fid.to_string())
            .env("CLUSTER_HSM_DFID", r.dfid.to_string())
            .env("CLUSTER_HSM_COOKIE", format!("{:#x}", r.cookie))
            .env("CLUSTER_HSM_ARCHIVE_ID", r.archive_id.to_string())
            .env("CLUSTER_HSM_DATA", &r.data)
            .env("CLUSTER_HSM_PATH", self.fid_path(&r.fid))
            .env("CLUSTER_HSM_DATA_PATH", self.fid_path(&r.dfid))
            .env("CLUSTER_HSM_ARCHIVE_PATH", self.archive_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()?;
        let pgid = i32::try_from(child.id()).unwrap_or(0);
        self.pgid.store(pgid, Ordering::Relaxed);
        if self.cancel.load(Ordering::Relaxed) {
            // Canceled while it was being started: its whole group goes, so no child of it
            // keeps the output pipe open.
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGTERM);
        }
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut w = line.split_whitespace();
                if let (Some("progress"), Some(b), Some(t)) = (w.next(), w.next(), w.next())
                    && let (Ok(b), Ok(t)) = (b.parse(), t.parse())
                {
                    self.bytes.store(b, Ordering::Relaxed);
                    self.total.store(t, Ordering::Relaxed);
                }
            }
        }
        let status = child.wait()?;
        self.pgid.store(0, Ordering::Relaxed);
        debug!(cookie = r.cookie, ?status, "hsm command ended");
        match status.code() {
            Some(0) => Ok(()),
            Some(code) => Err(std::io::Error::from_raw_os_error(code)),
            None => Err(std::io::Error::from_raw_os_error(libc::EINTR)),
        }
    }
}

/// Whether `path` is usable as the Lustre root (it has `.lustre/fid`).
pub fn check_root(path: &Path) -> Result<(), String> {
    if path.join(".lustre/fid").is_dir() {
        Ok(())
    } else {
        Err(format!("{} has no .lustre/fid directory: is it a Lustre mount?", path.display()))
    }
}
