//! Heads that do not lead serve the tree by asking the leading head: the client and server of that link.
//!
//! A following head's mount answers every operation through [`Remote`], which makes it on the
//! leading head over an authenticated peer link (the agents' port, a node name starting with
//! [`PEER_PREFIX`]). Reads are asked again when the leading head goes away mid-call; a change
//! that was under way fails with EHOSTDOWN, since whether it took effect is unknown. The
//! leading head also sends nodes' live state on the link ([`live`]), and the files that follow
//! from it alone are served from that.

mod live;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clusterfs_fs::{Answer, Caller, Errno, FsError, Kind, Node, Result, Tree, Write};
use dashmap::DashMap;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::auth::{Secret, agent_handshake};
use crate::head::cluster::Cluster;
use crate::head::lead::Candidate;
use crate::proto::{
    Conn, Frame, Message, ProtoError, TreeAnswer, TreeCall, TreeCaller, TreeOp, epoch_ns, from_epoch_ns,
};
use crate::view::jobs::{SPEC_FILE_READS, new_node};
use crate::view::nodes::{
    FIXED_FILES, LIVE_FILES, SET_FILES, dir_file_node, dir_listing, file_node, fixed_render, live_render, node_listing,
    set_render,
};
use crate::view::{RemoteCaller, View, caller_groups};
use live::LiveTable;

/// Node names of peer links start with it; agents' names cannot.
pub const PEER_PREFIX: &str = "+head:";
/// How long a call waits for a leading head to be known and reachable.
const FIND_LEADER: Duration = Duration::from_secs(15);
/// How long a render is waited for before it is left to finish later.
const QUICK: Duration = Duration::from_millis(200);
/// Stand-in handles of a peer link's calls: high bits no local handle has.
const HANDLE_BASE: u64 = 1 << 63;
/// How long a node is taken as the leading head gave it (the kernel's own attribute TTL for
/// files): `cat f` asks for it at lookup and again at open, `echo x > ctl` at truncation and
/// at open. A job's output is asked for each time: its size grows.
const NODE_TTL: Duration = Duration::from_millis(100);
/// Nodes kept at most, before the stale ones are dropped.
const NODES_KEPT: usize = 4096;

/// A path as the peer link and the node cache hold it.
fn owned(path: &[&str]) -> Vec<String> {
    path.iter().map(|s| s.to_string()).collect()
}

/// Answers waiting, by call id, with the node a change may change.
type Waiting = DashMap<u64, (oneshot::Sender<TreeAnswer>, Option<String>)>;

/// The tree of a following head: operations made on the leading head, but for the node files
/// that follow from what it sends of nodes.
pub struct Remote {
    /// This head's name on peer links.
    name: String,
    secret: Arc<Secret>,
    max_frame: usize,
    /// Where the leading head takes peer links, once known.
    leader: watch::Receiver<Option<Candidate>>,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    rt: tokio::runtime::Handle,
    /// Nodes lately asked for, by path. What a file holds is always asked for: a file gone
    /// meanwhile fails its read or write as it does on the leading head.
    nodes: DashMap<Vec<String>, (Instant, Node)>,
    /// Nodes' live state, as the leading head sends it on the current link.
    live: std::sync::RwLock<Arc<LiveTable>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("name", &self.name).finish_non_exhaustive()
    }
}

/// One peer link to the leading head.
#[derive(Debug)]
struct Link {
    addr: String,
    tx: mpsc::Sender<Message>,
    waiting: Arc<Waiting>,
    next: AtomicU64,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Remote {
    pub fn new(
        name: &str,
        secret: Arc<Secret>,
        max_frame: usize,
        leader: watch::Receiver<Option<Candidate>>,
    ) -> Remote {
        Remote {
            name: format!("{PEER_PREFIX}{name}"),
            secret,
            max_frame,
            leader,
            link: tokio::sync::Mutex::new(None),
            rt: tokio::runtime::Handle::current(),
            nodes: DashMap::new(),
            live: std::sync::RwLock::new(Arc::new(LiveTable::new(Arc::new(true.into())))),
        }
    }

    /// What the leading head sends of nodes on the current link.
    fn table(&self) -> Arc<LiveTable> {
        self.live.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether `path` is a file whose content `local_render` gives, once the leading head has
    /// sent anything: `jobs/new`, `nodes/README`, one of `nodes/`'s [`SET_FILES`], or one of a
    /// node's [`LIVE_FILES`] or [`FIXED_FILES`]. (Directories may wait on the leading head.)
    fn local(&self, path: &[&str]) -> bool {
        match path {
            ["jobs", "new"] => self.table().root().is_some(),
            ["nodes", "README"] => self.table().dir(None).is_some(),
            ["nodes", file] => SET_FILES.contains(file) && self.table().is_whole(),
            ["nodes", node, file] => {
                (LIVE_FILES.contains(file) || FIXED_FILES.contains(file)) && self.table().has(node)
            }
            _ => false,
        }
    }

    /// `path`'s node when this head knows it once the leading head has sent anything: the root,
    /// `jobs/` and `jobs/new`, `nodes/` and its files, a node's directory and its files.
    /// (Whether a file's content is known here is `local`'s business.)
    fn local_node(&self, path: &[&str]) -> Option<Node> {
        match path {
            [] => self.table().root(),
            ["jobs"] => self.table().root().and_then(|_| crate::view::root_node("jobs")),
            ["jobs", "new"] => self.table().root().and_then(|_| new_node()),
            ["nodes"] => self.table().dir(None),
            ["nodes", name] => match dir_file_node(name) {
                Some(file) => self.table().dir(None).map(|_| file),
                None => self.table().dir(Some(name)),
            },
            ["nodes", node, file] => file_node(&self.table().view(node)?, file),
            _ => None,
        }
    }

    /// What directory `path` lists when it follows from what the leading head sent of nodes:
    /// `nodes/` once every node was sent, or the directory of a node it sent.
    fn local_list(&self, path: &[&str]) -> Option<Vec<String>> {
        match path {
            ["nodes"] => self.table().names().map(dir_listing),
            ["nodes", node] => self.table().has(node).then(node_listing),
            _ => None,
        }
    }

    /// What `path` holds when `local` says this head knows it. (The table may have changed
    /// in between: a node gone or not whole any more is asked of the leading head.)
    fn local_render(&self, path: &[&str]) -> Option<Vec<u8>> {
        if !self.local(path) {
            return None;
        }
        match path {
            ["jobs", "new"] => Some(SPEC_FILE_READS.to_vec()),
            ["nodes", "README"] => fixed_render(&["README"]),
            ["nodes", file] => set_render(self.table().whole()?, file),
            ["nodes", node, file] => {
                let view = self.table().view(node)?;
                live_render(&view, file).or_else(|| fixed_render(&[node, file]))
            }
            _ => None,
        }
    }

    /// `path`'s node: as the leading head gave it within the last `NODE_TTL` (but for a log,
    /// whose size grows), else asked of it.
    fn node(self: &Arc<Self>, path: &[&str]) -> Result<Node> {
        if let Some(node) = self.local_node(path) {
            return Ok(node);
        }
        let key = owned(path);
        if let Some(hit) = self.nodes.get(&key).filter(|c| c.0.elapsed() < NODE_TTL) {
            return Ok(hit.1.clone());
        }
        let node = node_of(self.block(self.ask(path, &Caller::ROOT, TreeOp::Node))?)?;
        if node.kind != Kind::Log {
            if self.nodes.len() >= NODES_KEPT {
                self.nodes.retain(|_, c| c.0.elapsed() < NODE_TTL);
            }
            self.nodes.insert(key, (Instant::now(), node.clone()));
        }
        Ok(node)
    }

    /// A removal made on the leading head; what went with it is forgotten here once it is
    /// answered (and not before, so that no call in between keeps it).
    fn removal(self: Arc<Self>, fut: CallFuture) -> Answer<()> {
        Answer::later(async move {
            let done = fut.await.and_then(done_of);
            self.nodes.clear();
            done
        })
    }

    /// The link to the head that leads now, made when there is none or it leads no more.
    async fn link(&self) -> std::result::Result<Arc<Link>, String> {
        let mut held = self.link.lock().await;
        let Some(addr) = self.leader.borrow().as_ref().map(|l| l.addr.clone()) else {
            return Err("no head leads the cluster right now (an election is under way)".into());
        };
        if let Some(link) = held.as_ref()
            && link.addr == addr
            && !link.closed.load(Ordering::Relaxed)
        {
            return Ok(link.clone());
        }
        let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr))
            .await
            .map_err(|_| format!("the leading head at {addr} does not answer"))?
            .map_err(|e| format!("the leading head at {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        bound_silence(&stream);
        let mut conn = Conn::new(stream, self.max_frame);
        tokio::time::timeout(Duration::from_secs(5), agent_handshake(&mut conn, &self.secret, &self.name))
            .await
            .map_err(|_| format!("the leading head at {addr} did not finish the handshake"))?
            .map_err(|e| format!("the leading head at {addr}: {e}"))?;
        info!(leader = addr, "peer link to the leading head");
        let (tx, rx) = mpsc::channel(256);
        let link =
            Arc::new(Link { addr, tx, waiting: Arc::default(), next: AtomicU64::new(1), closed: Arc::default() });
        let table = Arc::new(LiveTable::new(link.closed.clone()));
        *self.live.write().unwrap_or_else(std::sync::PoisonError::into_inner) = table.clone();
        tokio::spawn(pump(conn, rx, link.waiting.clone(), table, link.closed.clone(), self.leader.clone()));
        *held = Some(link.clone());
        Ok(link)
    }

    /// Makes `op` on the leading head, finding it first; reads are asked again when it goes
    /// away mid-call.
    async fn call(self: Arc<Self>, path: Vec<String>, caller: TreeCaller, op: TreeOp) -> Result<TreeAnswer> {
        let deadline = Instant::now() + FIND_LEADER;
        let read = op.is_read();
        // What the leading head sent of a node before a change to it may be stale once the
        // change is answered.
        let node = match path.as_slice() {
            [top, node, ..] if op.changes() && top == "nodes" => Some(node.clone()),
            _ => None,
        };
        let call = Box::new(TreeCall { path, caller, op });
        loop {
            let link = match self.link().await {
                Ok(link) => link,
                Err(why) if Instant::now() < deadline => {
                    debug!(why, "waiting for the leading head");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(why) => return Err(FsError::new(Errno::Again, format!("{why}; try again in a few seconds"))),
            };
            let id = link.next.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            link.waiting.insert(id, (tx, node.clone()));
            let sent = link.tx.send(Message::Tree { id, call: call.clone() }).await.is_ok();
            match rx.await {
                Ok(answer) => return Ok(answer),
                Err(_) if (read || !sent) && Instant::now() < deadline => {
                    link.closed.store(true, Ordering::Relaxed);
                    continue;
                }
                Err(_) if read => {
                    link.closed.store(true, Ordering::Relaxed);
                    return Err(FsError::new(
                        Errno::Again,
                        "the leading head went away and none answered this read since; try again in a few seconds",
                    ));
                }
                Err(_) => {
                    link.closed.store(true, Ordering::Relaxed);
                    return Err(FsError::new(
                        Errno::HostDown,
                        "the leading head went away during this change; whether it was made is unknown: \
                         look before trying again",
                    ));
                }
            }
        }
    }

    fn ask(self: &Arc<Self>, path: &[&str], caller: &Caller, op: TreeOp) -> CallFuture {
        let path = owned(path);
        // Groups name a submission's owner. Each costs a read of /proc, so only changes that
        // use them carry them (not reads, nor a submission's flush and release).
        let groups = if op.needs_groups() { caller_groups(caller) } else { Vec::new() };
        let caller = TreeCaller { uid: caller.uid, gid: caller.gid, groups };
        Box::pin(self.clone().call(path, caller, op))
    }

    /// Runs a call to its end for a method the layer wants answered now.
    fn block(&self, fut: CallFuture) -> Result<TreeAnswer> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        on_this_thread(|| rx.recv().unwrap_or_else(|_| Err(FsError::new(Errno::Io, "the head is stopping"))))
    }
}

/// A peer link whose other end is gone without a word fails within seconds instead of hours:
/// keepalive probes while it is idle, a bound on unacknowledged data while it is not.
fn bound_silence(stream: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let set = [
        setsockopt(stream, sockopt::KeepAlive, &true),
        setsockopt(stream, sockopt::TcpKeepIdle, &5),
        setsockopt(stream, sockopt::TcpKeepInterval, &2),
        setsockopt(stream, sockopt::TcpKeepCount, &3),
        setsockopt(stream, sockopt::TcpUserTimeout, &10_000),
    ];
    if let Some(Err(e)) = set.into_iter().find(Result::is_err) {
        warn!(error = %e, "cannot bound how long the peer link may stay silent");
    }
}

/// Runs `wait` on this thread: a FUSE thread, or a runtime worker finishing a slow answer,
/// which hands its other tasks on while it waits (the call it waits for among them).
fn on_this_thread<T>(wait: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
        _ => wait(),
    }
}

type CallFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<TreeAnswer>> + Send>>;

/// Carries calls out and answers in until the link fails; then every waiting call learns it.
async fn pump(
    mut conn: Conn<TcpStream>,
    mut rx: mpsc::Receiver<Message>,
    waiting: Arc<Waiting>,
    live: Arc<LiveTable>,
    closed: Arc<std::sync::atomic::AtomicBool>,
    mut leader: watch::Receiver<Option<Candidate>>,
) {
    let to = leader.borrow_and_update().as_ref().map(|l| l.addr.clone());
    let why = loop {
        tokio::select! {
            // A head that went without a word (powered off) answers nothing more: its calls
            // are asked again of the head that leads now.
            changed = leader.changed() => match changed {
                Ok(()) if leader.borrow().as_ref().map(|l| &l.addr) != to.as_ref() => {
                    break "another head leads".to_string();
                }
                Ok(()) => {}
                Err(_) => break "the head is stopping".to_string(),
            },
            frame = conn.recv_frame() => match frame {
                Ok(Frame::Message(Message::TreeAnswer { id, answer })) => {
                    if let Some((_, (tx, node))) = waiting.remove(&id) {
                        if let Some(node) = node {
                            live.forget(&node);
                        }
                        let _ = tx.send(answer);
                    }
                }
                Ok(Frame::Message(Message::Live { nodes, gone, reset, complete, started_ns })) => {
                    live.apply(nodes, gone, reset, complete, started_ns);
                }
                Ok(_) => break "protocol violation: not a tree answer".to_string(),
                Err(e) => break e.to_string(),
            },
            out = rx.recv() => match out {
                Some(msg) => if let Err(e) = conn.send(&msg).await {
                    break e.to_string();
                },
                None => break "no longer used".to_string(),
            },
        }
    };
    debug!(why, "peer link to the leading head closed");
    closed.store(true, Ordering::Relaxed);
    waiting.clear();
}

fn node_of(answer: TreeAnswer) -> Result<Node> {
    match answer {
        TreeAnswer::Node { kind, perm, uid, gid, mtime_ns, size, generation } => Ok(Node {
            kind: kind_of(&kind)
                .ok_or_else(|| FsError::new(Errno::Io, format!("the leading head named kind {kind:?}")))?,
            perm,
            uid,
            gid,
            mtime: from_epoch_ns(mtime_ns),
            size,
            generation,
        }),
        other => unexpected(other),
    }
}

fn bytes_of(answer: TreeAnswer) -> Result<Vec<u8>> {
    match answer {
        TreeAnswer::Bytes { data } => Ok(data),
        other => unexpected(other),
    }
}

fn done_of(answer: TreeAnswer) -> Result<()> {
    match answer {
        TreeAnswer::Done => Ok(()),
        other => unexpected(other),
    }
}

/// A call whose answer is bytes, for the layer to finish from a task.
fn bytes_later(fut: CallFuture) -> Answer<Vec<u8>> {
    Answer::later(async move { bytes_of(fut.await?) })
}

/// A call whose answer is that it was done, for the layer to finish from a task.
fn done_later(fut: CallFuture) -> Answer<()> {
    Answer::later(async move { done_of(fut.await?) })
}

fn unexpected<T>(answer: TreeAnswer) -> Result<T> {
    match answer {
        TreeAnswer::Failed { errno, message } => Err(FsError::new(Errno::from_code(errno), message)),
        other => Err(FsError::new(Errno::Io, format!("the leading head answered out of turn: {other:?}"))),
    }
}

const KINDS: [(Kind, &str); 6] = [
    (Kind::Dir, "dir"),
    (Kind::Snapshot, "snapshot"),
    (Kind::Log, "log"),
    (Kind::Control, "control"),
    (Kind::Error, "error"),
    (Kind::Blocking, "blocking"),
];

fn kind_of(name: &str) -> Option<Kind> {
    KINDS.iter().find(|(_, n)| *n == name).map(|(k, _)| *k)
}

fn kind_name(kind: Kind) -> &'static str {
    KINDS.iter().find(|(k, _)| *k == kind).map_or("snapshot", |(_, n)| n)
}

/// The tree of a following head, for the FUSE layer.
#[derive(Debug, Clone)]
pub struct RemoteTree(pub Arc<Remote>);

impl Tree for RemoteTree {
    /// Answers come from the leading head, and the layer asks for them from its blocking
    /// pool; but for what follows from the nodes it sent.
    fn remote(&self, path: &[&str]) -> bool {
        !self.0.local(path)
    }

    fn node(&self, path: &[&str]) -> Result<Node> {
        self.0.node(path)
    }

    fn list(&self, path: &[&str]) -> Result<Vec<String>> {
        if let Some(names) = self.0.local_list(path) {
            return Ok(names);
        }
        match self.0.block(self.0.ask(path, &Caller::ROOT, TreeOp::List))? {
            TreeAnswer::Names { names } => Ok(names),
            other => unexpected(other),
        }
    }

    /// Answered now when the leading head answers within `QUICK`, as nearly every render is,
    /// so that `stat` sizes a file by what a read gives; a render that waits (a `wait` file)
    /// is finished later.
    fn render(&self, path: &[&str], caller: &Caller, nonblock: bool) -> Answer<Vec<u8>> {
        if let Some(data) = self.0.local_render(path) {
            return Answer::Now(Ok(data));
        }
        let fut = self.0.ask(path, caller, TreeOp::Render { nonblock });
        let (tx, mut rx) = oneshot::channel();
        self.0.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        let quick = on_this_thread(|| futures::executor::block_on(tokio::time::timeout(QUICK, &mut rx)));
        match quick {
            Ok(Ok(answer)) => Answer::Now(answer.and_then(bytes_of)),
            Ok(Err(_)) => Answer::Now(Err(FsError::new(Errno::Io, "the head is stopping"))),
            Err(_) => Answer::later(async move {
                rx.await.unwrap_or_else(|_| Err(FsError::new(Errno::Io, "the head is stopping"))).and_then(bytes_of)
            }),
        }
    }

    /// A job's output grows on the leading head: read from a task, so `tail -f` on a slow
    /// link holds no FUSE thread.
    fn read_log(&self, path: &[&str], caller: &Caller, offset: u64, size: u32) -> Answer<Vec<u8>> {
        bytes_later(self.0.ask(path, caller, TreeOp::ReadLog { offset, size }))
    }

    fn write(&self, path: &[&str], caller: &Caller, write: Write<'_>) -> Answer<Vec<u8>> {
        let op = TreeOp::Write { handle: write.handle, offset: write.offset, data: write.data.to_vec() };
        bytes_later(self.0.ask(path, caller, op))
    }

    fn flush(&self, path: &[&str], caller: &Caller, handle: u64) -> Answer<()> {
        done_later(self.0.ask(path, caller, TreeOp::Flush { handle }))
    }

    fn release(&self, path: &[&str], caller: &Caller, handle: u64) {
        let fut = self.0.ask(path, caller, TreeOp::Release { handle });
        self.0.rt.spawn(async move {
            if let Err(e) = fut.await {
                debug!(error = %e, "a release did not reach the leading head (its link ends the handle)");
            }
        });
    }

    fn mkdir(&self, path: &[&str], caller: &Caller, mode: u32) -> Answer<()> {
        done_later(self.0.ask(path, caller, TreeOp::Mkdir { mode }))
    }

    fn rmdir(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        self.0.clone().removal(self.0.ask(path, caller, TreeOp::Rmdir))
    }

    fn create(&self, path: &[&str], caller: &Caller, mode: u32) -> Answer<()> {
        done_later(self.0.ask(path, caller, TreeOp::Create { mode }))
    }

    fn unlink(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        self.0.clone().removal(self.0.ask(path, caller, TreeOp::Unlink))
    }

    fn chmod(&self, path: &[&str], caller: &Caller, mode: u32) -> Result<()> {
        self.0.nodes.remove(&owned(path));
        done_of(self.0.block(self.0.ask(path, caller, TreeOp::Chmod { mode }))?)
    }
}

/// Serves a following head's peer link on the leading head until it closes; the control
/// handles it left open are released then.
pub async fn serve(view: Arc<View>, cluster: Arc<Cluster>, mut conn: Conn<TcpStream>, link: u64, max_frame: usize) {
    let (tx, mut rx) = mpsc::channel::<Message>(256);
    let open: Arc<DashMap<u64, (Vec<String>, TreeCaller)>> = Arc::default();
    // Every node first, then each as it changes.
    let mut changes = cluster.changes();
    if let Err(e) = live::send_all(&cluster, &mut conn, max_frame).await {
        return info!(why = %e, "peer link closed");
    }
    let why = loop {
        tokio::select! {
            changed = changes.recv() => {
                let sent = match changed {
                    Ok(name) => live::send_changes(&cluster, &mut changes, name, &mut conn, max_frame).await,
                    Err(_) => live::send_all(&cluster, &mut conn, max_frame).await,
                };
                if let Err(e) = sent {
                    break e.to_string();
                }
            },
            frame = conn.recv_frame() => match frame {
                Ok(Frame::Message(Message::Tree { id, call })) => {
                    let (view, tx, open) = (view.clone(), tx.clone(), open.clone());
                    tokio::spawn(async move {
                        let answer = answer(&view, *call, link, &open, max_frame).await;
                        let _ = tx.send(Message::TreeAnswer { id, answer }).await;
                    });
                }
                Ok(_) => break "protocol violation: not a tree call".to_string(),
                Err(ProtoError::Closed) => break "closed".to_string(),
                Err(e) => break e.to_string(),
            },
            out = rx.recv() => if let Some(msg) = out && let Err(e) = conn.send(&msg).await {
                break e.to_string();
            },
        }
    };
    info!(why, handles = open.len(), "peer link closed");
    let left: Vec<(u64, (Vec<String>, TreeCaller))> = open.iter().map(|e| (*e.key(), e.value().clone())).collect();
    for (handle, (path, caller)) in left {
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        let who = RemoteCaller::new(caller.uid, caller.gid, caller.groups);
        view.release(&path, &who.0, handle);
    }
}

/// Makes one call of a peer link on this head's own tree.
async fn answer(
    view: &View,
    call: TreeCall,
    link: u64,
    open: &DashMap<u64, (Vec<String>, TreeCaller)>,
    max_frame: usize,
) -> TreeAnswer {
    let TreeCall { path, caller, op } = call;
    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
    let who = RemoteCaller::new(caller.uid, caller.gid, caller.groups.clone());
    let me = &who.0;
    // Handles of the link's writers, kept apart from this head's own and other links'.
    let handle = |h: u64| HANDLE_BASE | (link << 40) | (h & ((1 << 40) - 1));
    let result = match op {
        TreeOp::Node => view.node(&parts).map(|n| TreeAnswer::Node {
            kind: kind_name(n.kind).to_string(),
            perm: n.perm,
            uid: n.uid,
            gid: n.gid,
            mtime_ns: epoch_ns(n.mtime),
            size: n.size,
            generation: n.generation,
        }),
        TreeOp::List => view.list(&parts).map(|names| TreeAnswer::Names { names }),
        TreeOp::Render { nonblock } => {
            view.render(&parts, me, nonblock).finish().await.map(|data| TreeAnswer::Bytes { data })
        }
        TreeOp::ReadLog { offset, size } => {
            view.read_log(&parts, me, offset, size).finish().await.map(|data| TreeAnswer::Bytes { data })
        }
        TreeOp::Write { handle: h, offset, data } => {
            open.insert(handle(h), (path.clone(), caller.clone()));
            let write = Write { handle: handle(h), offset, data: &data };
            view.write(&parts, me, write).finish().await.map(|data| TreeAnswer::Bytes { data })
        }
        TreeOp::Flush { handle: h } => view.flush(&parts, me, handle(h)).finish().await.map(|()| TreeAnswer::Done),
        TreeOp::Release { handle: h } => {
            open.remove(&handle(h));
            view.release(&parts, me, handle(h));
            Ok(TreeAnswer::Done)
        }
        TreeOp::Mkdir { mode } => view.mkdir(&parts, me, mode).finish().await.map(|()| TreeAnswer::Done),
        TreeOp::Rmdir => view.rmdir(&parts, me).finish().await.map(|()| TreeAnswer::Done),
        TreeOp::Create { mode } => view.create(&parts, me, mode).finish().await.map(|()| TreeAnswer::Done),
        TreeOp::Unlink => view.unlink(&parts, me).finish().await.map(|()| TreeAnswer::Done),
        TreeOp::Chmod { mode } => view.chmod(&parts, me, mode).map(|()| TreeAnswer::Done),
    };
    match result {
        Ok(TreeAnswer::Bytes { data }) if data.len() * 2 + 4096 > max_frame => TreeAnswer::Failed {
            errno: libc::EFBIG,
            message: format!(
                "{} is {} bytes, too big to pass between heads (head.max_frame): read it on the leading head",
                path.join("/"),
                data.len()
            ),
        },
        Ok(answer) => answer,
        Err(e) => {
            if !e.is_routine() {
                warn!(path = path.join("/"), error = %e, "a peer's call failed");
            }
            TreeAnswer::Failed { errno: e.errno.code(), message: e.message }
        }
    }
}
