//! File copies on the agent: take a file from a relay parent, write it as its owner, and pass it on to children while still receiving.
//!
//! A relay connection is authenticated like the head link (the dialer proves it knows the
//! cluster secret, and so does this side), then carries a `Copy` plan (the file's facts and the
//! subtree this node heads) and the file as checksummed chunks from offset 0. A node may get
//! a second feed for the same run (the head routing around a parent that dropped out): data
//! it already has is skipped, so its children see one seamless stream. The file is written
//! under a temporary name by a thread holding the job user's file-system identity, checked
//! against the whole-file checksum, given the source's mode, owner and mtime, then renamed.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clusterfs::auth::{Secret, head_handshake};
use clusterfs::jobs::copy::{Branch, FileFacts, FileSum, Plan, chunk_sum, close_feed, open_feed};
use clusterfs::jobs::{Exit, Run};
use clusterfs::proto::{Conn, Frame, Message, ProtoError};
use dashmap::DashMap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Notify, mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::runner::write_exit;

/// A copy that gets no data for this long fails.
const STALL: Duration = Duration::from_secs(60);
/// Chunks queued toward one child (or the writer) before the feed waits.
const QUEUE: usize = 16;
/// A child that takes no chunk for this long is dropped (the head feeds its subtree), so one
/// stuck node never stalls the nodes above it.
const CHILD_WAIT: Duration = Duration::from_secs(5);

/// What the writer thread is told.
#[derive(Debug)]
enum Write {
    Data(u64, Bytes),
    /// Everything came and the checksum matched: finish the file.
    Commit,
}

/// One copy run this agent expects or receives.
#[derive(Debug)]
struct Incoming {
    run: Run,
    dir: PathBuf,
    ended: Arc<Notify>,
    /// Bytes written in order so far.
    bytes: AtomicU64,
    last_data: std::sync::Mutex<Instant>,
    state: Mutex<Receive>,
    /// Becomes true when the run has ended: every feed connection closes.
    over: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct Receive {
    plan: Option<Plan>,
    have: u64,
    sum: FileSum,
    writer: Option<mpsc::Sender<Write>>,
    written: Option<oneshot::Receiver<Result<(), String>>>,
    children: Vec<mpsc::Sender<Frame>>,
    ended: bool,
}

/// The relay of one agent process, shared by its node names.
#[derive(Debug)]
pub struct Relay {
    secret: Secret,
    max_frame: usize,
    local: std::net::SocketAddr,
    incoming: DashMap<u64, Arc<Incoming>>,
}

impl Relay {
    /// Binds the relay listener and serves it from a task.
    pub async fn start(listen: &str, secret: Secret, max_frame: usize) -> std::io::Result<Arc<Relay>> {
        let listener = TcpListener::bind(listen).await?;
        let relay = Arc::new(Relay { secret, max_frame, local: listener.local_addr()?, incoming: DashMap::new() });
        info!(addr = %relay.local, "relay listening");
        let r = relay.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let r = r.clone();
                        tokio::spawn(async move {
                            if let Err(e) = r.serve(stream).await {
                                debug!(%peer, error = %e, "relay connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "relay accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(relay)
    }

    /// The address to give the head: the listener's, with the address this host dials the
    /// head from when the listener takes every address.
    pub fn addr(&self, toward_head: std::net::IpAddr) -> String {
        let ip = if self.local.ip().is_unspecified() { toward_head } else { self.local.ip() };
        std::net::SocketAddr::new(ip, self.local.port()).to_string()
    }

    /// Bytes of copy run `run` written so far, if it is one of ours.
    pub fn bytes(&self, run: u64) -> Option<u64> {
        self.incoming.get(&run).map(|i| i.bytes.load(Ordering::Relaxed))
    }

    /// Expects copy run `run` (started now in `dir`): its feed may come.
    pub fn expect(self: &Arc<Self>, run: &Run, dir: PathBuf, ended: Arc<Notify>) {
        let (over, _) = watch::channel(false);
        let inc = Arc::new(Incoming {
            run: run.clone(),
            dir,
            ended,
            bytes: AtomicU64::new(0),
            last_data: std::sync::Mutex::new(Instant::now()),
            state: Mutex::new(Receive::default()),
            over,
        });
        self.incoming.insert(run.run, inc.clone());
        // A copy whose feed never comes, or stops, fails instead of waiting for ever.
        let relay = self.clone();
        tokio::spawn(async move {
            let mut over = inc.over.subscribe();
            loop {
                let idle = inc.last_data.lock().map(|t| t.elapsed()).unwrap_or_default();
                if idle >= STALL {
                    let why = format!("no data for {} s", STALL.as_secs());
                    relay.end(&inc, &mut *inc.state.lock().await, Err(why)).await;
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(STALL - idle) => {}
                    _ = over.wait_for(|o| *o) => return,
                }
            }
        });
    }

    /// Stops copy run `run` (killed or forgotten), from a task: its feeds stop at once, and it
    /// ends as soon as a chunk being passed on has gone. True if it was a copy run.
    pub fn abort(self: &Arc<Self>, run: u64, why: &str) -> bool {
        let Some(inc) = self.incoming.get(&run).map(|i| i.clone()) else { return false };
        let _ = inc.over.send(true);
        let (relay, why) = (self.clone(), why.to_string());
        tokio::spawn(async move { relay.end(&inc, &mut *inc.state.lock().await, Err(why)).await });
        true
    }

    /// Drops what is kept of `run` once the head has its end.
    pub fn forget(&self, run: u64) {
        self.incoming.remove(&run);
    }

    /// One relay connection: authenticate, take the plan, receive.
    async fn serve(self: &Arc<Self>, stream: TcpStream) -> Result<(), ProtoError> {
        let _ = stream.set_nodelay(true);
        let mut conn = Conn::new(stream, self.max_frame);
        tokio::time::timeout(Duration::from_secs(5), head_handshake(&mut conn, &self.secret, |_| Ok(())))
            .await
            .map_err(|_| ProtoError::Timeout("the relay handshake"))??;
        conn.send(&Message::Welcome { interval_ms: 0 }).await?;
        let plan = match conn.recv().await? {
            Message::Copy { plan } => *plan,
            other => return Err(ProtoError::Unexpected { expected: "copy", got: other.name().into() }),
        };
        // The head asks the node for the run and feeds it at about the same time.
        let mut waited = Duration::ZERO;
        let inc = loop {
            if let Some(i) = self.incoming.get(&plan.tree.run) {
                break i.clone();
            }
            if waited > Duration::from_secs(10) {
                return Err(ProtoError::Refused(format!("run {} is not a copy this node expects", plan.tree.run)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
        };
        self.begin(&inc, plan).await;
        let mut over = inc.over.subscribe();
        loop {
            let frame = tokio::select! {
                f = conn.recv_frame() => f?,
                _ = over.wait_for(|o| *o) => return Ok(()),
            };
            let Frame::Chunk { offset, sum, data } = frame else {
                return Err(ProtoError::Unexpected { expected: "a file chunk", got: "another frame".into() });
            };
            if chunk_sum(&data) != sum {
                // This feed is broken; another one may still bring the data.
                return Err(ProtoError::BadFrame(format!("the chunk at byte {offset} fails its checksum")));
            }
            if !self.take(&inc, offset, sum, data).await? {
                return Ok(());
            }
        }
    }

    /// The first feed of a run starts its writer and its children's feeds.
    async fn begin(&self, inc: &Arc<Incoming>, plan: Plan) {
        let mut st = inc.state.lock().await;
        if st.plan.is_some() || st.ended {
            return;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let (done_tx, done_rx) = oneshot::channel();
        let (run, file, dest) = (inc.run.clone(), plan.file.clone(), plan.tree.dest.clone());
        let spawned = std::thread::Builder::new().name(format!("copy-{}", run.run)).spawn(move || {
            let _ = done_tx.send(write_file(&run, &file, &dest, rx));
        });
        if let Err(e) = spawned {
            warn!(run = inc.run.run, error = %e, "cannot start the copy writer");
        }
        st.writer = Some(tx);
        st.written = Some(done_rx);
        for child in &plan.tree.children {
            let (tx, rx) = mpsc::channel(QUEUE);
            st.children.push(tx);
            let (secret, max_frame, file, child) =
                (self.secret.clone(), self.max_frame, plan.file.clone(), child.clone());
            tokio::spawn(async move {
                let node = child.node.clone();
                if let Err(e) = feed_child(&secret, max_frame, file, child, rx).await {
                    warn!(child = node, error = %e, "relay to a child failed");
                }
            });
        }
        info!(run = inc.run.run, dest = plan.tree.dest, children = plan.tree.children.len(), "copy feed began");
        st.plan = Some(plan);
    }

    /// Takes one checked chunk (`sum` is its checksum): writes and forwards it unless this node
    /// has it already (a second feed starts from byte 0). Every feed sends the same chunks, so
    /// a new one starts exactly where this node is. False once the run ended.
    async fn take(&self, inc: &Arc<Incoming>, offset: u64, sum: u64, data: Bytes) -> Result<bool, ProtoError> {
        let mut st = inc.state.lock().await;
        if st.ended || *inc.over.borrow() {
            return Ok(false);
        }
        let end = offset + data.len() as u64;
        if end <= st.have {
            return Ok(true);
        }
        if offset != st.have {
            return Err(ProtoError::BadFrame(format!("the chunk at byte {offset} does not follow byte {}", st.have)));
        }
        if let Some(w) = &st.writer
            && w.send(Write::Data(offset, data.clone())).await.is_err()
        {
            // The writer stopped (its error is read at the end); the children still get the file.
            st.writer = None;
        }
        let mut alive = Vec::with_capacity(st.children.len());
        for child in std::mem::take(&mut st.children) {
            let frame = Frame::Chunk { offset, sum, data: data.clone() };
            if let Ok(Ok(())) = tokio::time::timeout(CHILD_WAIT, child.send(frame)).await {
                alive.push(child);
            }
        }
        st.children = alive;
        st.sum.add_chunk(sum);
        st.have = end;
        inc.bytes.store(end, Ordering::Relaxed);
        if let Ok(mut t) = inc.last_data.lock() {
            *t = Instant::now();
        }
        let (size, want) = st.plan.as_ref().map_or((0, String::new()), |p| (p.file.size, p.file.sum.clone()));
        if end >= size {
            let verdict = if st.sum.hex() == want {
                Ok(())
            } else {
                Err(format!("the file's checksum does not match ({} here, {want} sent)", st.sum.hex()))
            };
            self.end(inc, &mut st, verdict).await;
            return Ok(false);
        }
        Ok(true)
    }

    /// Ends a run once: commits or drops the file, records the exit, tells the link.
    async fn end(&self, inc: &Arc<Incoming>, st: &mut Receive, verdict: Result<(), String>) {
        if st.ended {
            return;
        }
        st.ended = true;
        st.children.clear();
        let writer = st.writer.take();
        let outcome = match verdict {
            Ok(()) => {
                if let Some(w) = writer {
                    // A writer that stopped early has its error read below.
                    let _ = w.send(Write::Commit).await;
                }
                None
            }
            Err(why) => {
                // Closing the channel without a commit makes the writer remove its temporary file.
                drop(writer);
                Some(why)
            }
        };
        let result = match st.written.take() {
            Some(rx) => rx.await.unwrap_or_else(|_| Err("the copy writer died".into())),
            None => Err("the copy never began".into()),
        };
        let exit = match (outcome, result) {
            (None, Ok(())) => Exit { code: 0, signal: None, reason: None },
            (Some(why), _) | (None, Err(why)) => {
                Exit { code: 1, signal: None, reason: Some(format!("copy failed: {why}")) }
            }
        };
        info!(run = inc.run.run, code = exit.code, reason = ?exit.reason, "copy ended");
        if let Err(e) = write_exit(&inc.dir, &exit) {
            warn!(run = inc.run.run, error = %e, "cannot record the copy's end");
        }
        let _ = inc.over.send(true);
        inc.ended.notify_one();
    }
}

/// Feeds one child from this node's chunks, then waits for it to close (it has the file).
async fn feed_child(
    secret: &Secret,
    max_frame: usize,
    file: FileFacts,
    child: Branch,
    mut chunks: mpsc::Receiver<Frame>,
) -> Result<(), ProtoError> {
    let mut conn = open_feed(secret, max_frame, Plan { file, tree: child }).await?;
    while let Some(frame) = chunks.recv().await {
        conn.send_frame(&frame).await?;
    }
    match close_feed(&mut conn, STALL).await {
        Err(ProtoError::Timeout(_)) => Ok(()),
        other => other,
    }
}

/// Takes this thread's file-system identity to be `run`'s user, so every file it makes or
/// touches is checked and owned as theirs. Only this thread changes: the kernel keeps
/// credentials per thread, and these raw calls (unlike libc's wrappers) touch no other.
fn become_user(run: &Run) -> Result<(), String> {
    if run.uid == 0 {
        return Ok(());
    }
    crate::isolate::set_fs_identity(run.uid, run.gid, &run.groups).map_err(|e| format!("setgroups: {e}"))
}

/// Writes the file to `dest` from `rx`, as the run's user: parents made, a temporary name in
/// the same directory, then mode, owner and mtime set and the name swapped in. Nothing is left
/// behind when it fails.
fn write_file(run: &Run, file: &FileFacts, dest: &str, mut rx: mpsc::Receiver<Write>) -> Result<(), String> {
    become_user(run)?;
    let dest = Path::new(dest);
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Err(format!("{} is not a file path", dest.display()));
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".{}.clusterfs-{}", name.to_string_lossy(), run.run));
    let result = (|| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        loop {
            match rx.blocking_recv() {
                Some(Write::Data(at, data)) => {
                    f.write_all_at(&data, at).map_err(|e| format!("writing {}: {e}", tmp.display()))?
                }
                Some(Write::Commit) => break,
                None => return Err("the copy stopped".to_string()),
            }
        }
        f.sync_all().map_err(|e| format!("syncing {}: {e}", tmp.display()))?;
        let meta = f.metadata().map_err(|e| e.to_string())?;
        let mut mode = file.mode;
        if std::os::unix::fs::MetadataExt::uid(&meta) != file.uid
            || std::os::unix::fs::MetadataExt::gid(&meta) != file.gid
        {
            match nix::unistd::fchown(&f, Some(file.uid.into()), Some(file.gid.into())) {
                Ok(()) => {}
                // As `cp -p` does for a user not in the source's group: the copy stays in the
                // user's own group, and without set-id bits, which were meant for the other.
                Err(nix::errno::Errno::EPERM) if run.uid != 0 => {
                    tracing::info!(run = run.run, dest = %dest.display(), gid = file.gid, "the copy keeps the user's group");
                    mode &= !0o6000;
                }
                Err(e) => return Err(format!("cannot give {} to {}:{}: {e}", dest.display(), file.uid, file.gid)),
            }
        }
        nix::sys::stat::fchmod(&f, nix::sys::stat::Mode::from_bits_truncate(mode))
            .map_err(|e| format!("cannot set the mode of {}: {e}", dest.display()))?;
        let mtime = nix::sys::time::TimeSpec::new(file.mtime_s, file.mtime_ns);
        nix::sys::stat::futimens(&f, &nix::sys::time::TimeSpec::UTIME_OMIT, &mtime)
            .map_err(|e| format!("cannot set the mtime of {}: {e}", dest.display()))?;
        std::fs::rename(&tmp, dest).map_err(|e| format!("cannot rename to {}: {e}", dest.display()))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
