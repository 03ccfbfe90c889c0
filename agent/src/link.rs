//! One node identity's connection to the head: dial, authenticate, report, answer; redial on loss.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clusterfs::auth::{Secret, agent_handshake};
use clusterfs::jobs::{STDERR, STDOUT, stream_id};
use clusterfs::proto::{Conn, Frame, Message, Op, ProtoError, Reply};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::images::Images;
use crate::mover::{Mover, MoverConfig};
use crate::probe::Shared;
use crate::relay::Relay;
use crate::runner::{Runner, Started};
use crate::vms::{Verb, Vms};

/// How often output of running jobs is sent on.
const SYNC_EVERY: Duration = Duration::from_millis(50);
/// Largest piece of output in one frame.
const CHUNK: usize = 256 * 1024;
/// Data to the head left unacknowledged this long ends the connection (TCP_USER_TIMEOUT): an
/// agent cut off from its head redials, and is back soon after the link heals instead of
/// after TCP's retransmission backoff (tens of seconds after a 30 s partition).
const LINK_DEAD_AFTER: Duration = Duration::from_secs(10);

/// Settings shared by every identity of one agent process.
#[derive(Debug)]
pub struct LinkConfig {
    pub heads: Vec<String>,
    pub secret: Secret,
    pub max_frame: usize,
    /// Where each node name keeps its runs (`<state>/<node>/runs`).
    pub state: PathBuf,
    /// Takes file copies for every node name of this process.
    pub relay: Arc<Relay>,
    /// Loop devices and mounts of images, for every node name of this process.
    pub images: Arc<Images>,
    /// The HSM mover role, when this agent has it.
    pub mover: Option<MoverConfig>,
}

/// Where the head's copy of a run's output stands, for this connection.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    sent: [u64; 2],
    exited_sent: bool,
    /// A copy run's bytes written, as last told.
    copied: u64,
}

/// Answers already given, by request id: a request seen again (after a reconnect) is
/// answered from here and never executed twice.
#[derive(Debug, Default)]
pub struct Done {
    answers: HashMap<u64, Result<Reply, String>>,
    order: VecDeque<u64>,
}

const DONE_KEPT: usize = 4096;

impl Done {
    pub fn get(&self, id: u64) -> Option<Result<Reply, String>> {
        self.answers.get(&id).cloned()
    }

    pub fn put(&mut self, id: u64, answer: Result<Reply, String>) {
        if self.answers.insert(id, answer).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > DONE_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.answers.remove(&old);
            }
        }
    }
}

/// What one node name does: its runs, its HSM mover (when it has the role), its VMs.
#[derive(Debug, Clone)]
struct Roles {
    runner: Arc<Runner>,
    mover: Option<Arc<Mover>>,
    vms: Arc<Vms>,
}

/// Runs `node`'s link forever, redialling with exponential backoff (100 ms to 5 s, jittered).
pub async fn run(node: String, cfg: Arc<LinkConfig>, probe: Arc<Mutex<Shared>>) {
    let runner = match Runner::new(cfg.state.join(&node).join("runs")) {
        Ok(r) => Arc::new(r),
        Err(e) => return warn!(node, error = %e, "cannot keep runs: this node will not serve"),
    };
    let mover = cfg.mover.clone().map(|m| Mover::new(m, &node));
    let vms = Arc::new(Vms::new(cfg.state.join(&node).join("vms")));
    {
        let vms = vms.clone();
        let _ = tokio::task::spawn_blocking(move || vms.adopt()).await;
    }
    let mut backoff = Duration::from_millis(100);
    let mut done = Done::default();
    let mut next_head = 0usize;
    // Whether the last dial failed too: the first failure of a run of them is said, the
    // redials after it only in debug.
    let mut failing = false;
    loop {
        let head = &cfg.heads[next_head % cfg.heads.len()];
        let roles = Roles { runner: runner.clone(), mover: mover.clone(), vms: vms.clone() };
        match session(&node, head, &cfg, &probe, &roles, &mut done).await {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                failing = false;
            }
            Err(ProtoError::Refused(reason)) => warn!(node, head, reason, "refused by the head"),
            Err(ProtoError::Auth(reason)) => {
                warn!(node, head, reason, "authentication failed: --secret-file must be the head's state_dir/secret")
            }
            Err(e) if !failing => {
                warn!(node, head, error = %e, "no link to the head: dialling again (every head of --head in turn)");
                failing = true;
            }
            Err(e) => debug!(node, head, error = %e, "link lost"),
        }
        next_head += 1;
        // Jitter spreads the redials of many identities after a head restart.
        let jitter = Duration::from_millis(rand::random_range(0..backoff.as_millis() as u64 / 4 + 1));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(clusterfs::proto::REDIAL_MAX);
    }
}

/// One connection, until it fails. Ok(()) when it was established and then ended.
async fn session(
    node: &str,
    head: &str,
    cfg: &LinkConfig,
    probe: &Arc<Mutex<Shared>>,
    roles: &Roles,
    done: &mut Done,
) -> Result<(), ProtoError> {
    let (runner, mover, vms) = (&roles.runner, roles.mover.as_ref(), &roles.vms);
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(head))
        .await
        .map_err(|_| ProtoError::Timeout("the connection"))??;
    let _ = stream.set_nodelay(true);
    let ms = u32::try_from(LINK_DEAD_AFTER.as_millis()).unwrap_or(u32::MAX);
    if let Err(e) = nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::TcpUserTimeout, &ms) {
        warn!(head, error = %e, "cannot bound how long data to the head may go unacknowledged");
    }
    let toward_head = stream.local_addr()?.ip();
    let mut conn = Conn::new(stream, cfg.max_frame);
    let interval_ms = tokio::time::timeout(Duration::from_secs(5), agent_handshake(&mut conn, &cfg.secret, node))
        .await
        .map_err(|_| ProtoError::Timeout("the handshake"))??;
    let interval = Duration::from_millis(interval_ms.max(10));
    info!(node, head, interval_ms, "connected");
    // The head learns every run this node has; it answers with what it wants resent.
    conn.send(&Message::Runs { runs: runner.list() }).await?;
    conn.send(&Message::Relay { addr: cfg.relay.addr(toward_head) }).await?;
    if let Some(m) = mover {
        conn.send(&m.hello()).await?;
    }
    let mut cursors: HashMap<u64, Cursor> = HashMap::new();
    // VM consoles the head asked for, by VM id: the VM's name and how far the head has it.
    let mut consoles: HashMap<u64, (String, u64)> = HashMap::new();
    // Image operations (fsck, resize2fs) may take long: they answer from their own task.
    let (answers, mut answered) = tokio::sync::mpsc::channel::<(u64, Result<Reply, String>)>(64);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sync = tokio::time::interval(SYNC_EVERY);
    sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The head beats every interval. One not heard from for a while is taken for dead, even
    // when its connection stays open (a frozen or hung head): this link redials, to the next
    // head of the list. It is watched beside the work, which may be stuck sending to that head.
    let silence = (interval * clusterfs::proto::SILENCE_INTERVALS).max(clusterfs::proto::SILENCE_MIN);
    let start = tokio::time::Instant::now();
    // When the head was last heard from, in milliseconds since `start`.
    let heard = std::sync::atomic::AtomicU64::new(0);
    let last = || start + Duration::from_millis(heard.load(std::sync::atomic::Ordering::Relaxed));
    let watch = async {
        while last().elapsed() < silence {
            tokio::time::sleep_until(last() + silence).await;
        }
    };
    let work = async {
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let mut report = probe.lock().expect("probe lock is never poisoned: sampling does not panic").report(interval / 2);
                    report.jobs = runner.running();
                    conn.send(&Message::Sitrep { report }).await?;
                    // Most nodes never had a VM: no thread is asked for those (an agent serving
                    // a thousand node names would keep hundreds busy).
                    let list = if vms.any() {
                        let v = vms.clone();
                        tokio::task::spawn_blocking(move || v.status()).await.unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    if !list.is_empty() {
                        conn.send(&Message::Vms { vms: list }).await?;
                    }
                }
                _ = sync.tick() => {
                    for (run, cursor) in cursors.iter_mut() {
                        if let Some(bytes) = cfg.relay.bytes(*run).filter(|b| *b != cursor.copied) {
                            conn.send(&Message::Progress { run: *run, bytes }).await?;
                            cursor.copied = bytes;
                        }
                        send_output(&mut conn, runner, *run, cursor).await?;
                    }
                    for (id, (name, sent)) in consoles.iter_mut() {
                        while let Some(data) = vms.console(name, *sent, CHUNK).filter(|d| !d.is_empty()) {
                            let n = data.len() as u64;
                            let stream = clusterfs::vms::CONSOLE_STREAM | *id;
                            conn.send_frame(&Frame::Bulk { stream, offset: *sent, data: Bytes::from(data) }).await?;
                            *sent += n;
                        }
                    }
                    for news in mover.map(|m| m.news()).unwrap_or_default() {
                        conn.send(&news).await?;
                    }
                }
                // A run ended: its last output and exit go now, not at the next tick.
                _ = runner.ended.notified() => {
                    for (run, cursor) in cursors.iter_mut() {
                        send_output(&mut conn, runner, *run, cursor).await?;
                    }
                }
                Some((id, answer)) = answered.recv() => {
                    done.put(id, answer.clone());
                    conn.send(&Message::Response { id, result: answer }).await?;
                }
                msg = conn.recv() => match msg.inspect(|_| {
                    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
                    heard.store(ms, std::sync::atomic::Ordering::Relaxed);
                })? {
                    Message::Request { id, op } if is_blocking_op(&op) && done.get(id).is_none() => {
                        let (images, vms, answers) = (cfg.images.clone(), vms.clone(), answers.clone());
                        tokio::spawn(async move {
                            let answer = tokio::task::spawn_blocking(move || blocking_op(&images, &vms, op))
                                .await
                                .unwrap_or_else(|e| Err(format!("internal error: {e}")));
                            let _ = answers.send((id, answer)).await;
                        });
                    }
                    Message::Request { id, op } => {
                        let answer = match done.get(id) {
                            Some(a) => a,
                            None => {
                                let a = execute(op, runner, &cfg.relay, mover, &mut cursors).await;
                                done.put(id, a.clone());
                                a
                            }
                        };
                        conn.send(&Message::Response { id, result: answer }).await?;
                    }
                    Message::VmConsoleFrom { id, from } => {
                        match consoles.get_mut(&id) {
                            Some(c) => c.1 = from,
                            None => {
                                let v = vms.clone();
                                if let Ok(Some(name)) = tokio::task::spawn_blocking(move || v.name_of(id)).await {
                                    consoles.insert(id, (name, from));
                                }
                            }
                        }
                    }
                    Message::HsmAck { cookies } => {
                        if let Some(m) = mover {
                            m.ack(&cookies);
                        }
                    }
                    Message::Resume { run, from } => {
                        cursors.insert(run, Cursor { sent: from, exited_sent: false, copied: 0 });
                    }
                    Message::Beat => {}
                    other => return Err(ProtoError::Unexpected { expected: "a request", got: other.name().into() }),
                },
            }
        }
    };
    tokio::select! {
        r = work => r,
        () = watch => Err(ProtoError::Timeout("a beat from the head")),
    }
}

/// Sends what the head lacks of `run`'s output, then its exit once all output is out.
async fn send_output(
    conn: &mut Conn<TcpStream>,
    runner: &Runner,
    run: u64,
    cursor: &mut Cursor,
) -> Result<(), ProtoError> {
    let status = runner.output_status(run);
    for stream in [STDOUT, STDERR] {
        let s = stream as usize;
        while cursor.sent[s] < status.len[s] {
            let want = usize::try_from(status.len[s] - cursor.sent[s]).unwrap_or(CHUNK).min(CHUNK);
            let path = runner.run_dir(run).join(if stream == STDOUT { "stdout" } else { "stderr" });
            let data = clusterfs::jobs::read_at(&path, cursor.sent[s], want).map_err(ProtoError::Io)?;
            if data.is_empty() {
                break;
            }
            let n = data.len() as u64;
            conn.send_frame(&Frame::Bulk {
                stream: stream_id(run, stream),
                offset: cursor.sent[s],
                data: Bytes::from(data),
            })
            .await?;
            cursor.sent[s] += n;
        }
    }
    if let Some(exit) = status.exit
        && cursor.sent == status.len
        && !cursor.exited_sent
    {
        conn.send(&Message::Exited { run, exit, len: status.len }).await?;
        cursor.exited_sent = true;
    }
    Ok(())
}

/// Image and VM operations run system tools and may take long: they answer from a task.
fn is_blocking_op(op: &Op) -> bool {
    matches!(
        op,
        Op::ImageMount { .. }
            | Op::ImageUmount { .. }
            | Op::ImageGrow { .. }
            | Op::ImageScan { .. }
            | Op::ImageDetach { .. }
            | Op::VmCreate { .. }
            | Op::VmStart { .. }
            | Op::VmCommand { .. }
            | Op::VmRemove { .. }
    )
}

/// Runs an image or VM operation (blocking).
fn blocking_op(images: &Images, vms: &Vms, op: Op) -> Result<Reply, String> {
    let done = |r: Result<(), String>| r.map(|()| Reply::Done);
    match op {
        Op::VmCreate { launch } => done(crate::vms::check_qemu(&launch.qemu).and_then(|()| vms.create(&launch))),
        Op::VmStart { launch } => done(vms.create(&launch).and_then(|()| vms.start(&launch.name))),
        Op::VmCommand { name, verb } => {
            let verb = match verb.as_str() {
                "powerdown" => Verb::Powerdown,
                "quit" => Verb::Quit,
                "reset" => Verb::Reset,
                other => return Err(format!("unknown VM verb {other:?}")),
            };
            done(vms.command(&name, verb))
        }
        Op::VmRemove { name } => done(vms.remove(&name)),
        Op::ImageMount { path, mountpoint } => images.mount(&path, &mountpoint),
        Op::ImageUmount { path, mountpoint } => images.umount(&path, &mountpoint),
        Op::ImageGrow { path, mountpoint, size } => images.grow(&path, &mountpoint, size),
        Op::ImageScan { volumes } => Ok(Reply::Loops { loops: images.scan(&volumes) }),
        Op::ImageDetach { dev, path } => images.detach(&dev, &path),
        other => Err(format!("{other:?} is not an image operation")),
    }
}

async fn execute(
    op: Op,
    runner: &Arc<Runner>,
    relay: &Arc<Relay>,
    mover: Option<&Arc<Mover>>,
    cursors: &mut HashMap<u64, Cursor>,
) -> Result<Reply, String> {
    match op {
        Op::Ping => Ok(Reply::Pong),
        Op::Run(run) => {
            // Preparing a run writes and syncs files: off the runtime, so the many node names
            // of one process start their runs side by side.
            let (r, req) = (runner.clone(), run.clone());
            let started = tokio::task::spawn_blocking(move || r.start(&req)).await.map_err(|e| e.to_string())??;
            if started == Started::Now && run.copy.is_some() {
                relay.expect(&run, runner.run_dir(run.run), runner.ended.clone());
            }
            cursors.entry(run.run).or_insert(Cursor { sent: [0, 0], exited_sent: false, copied: 0 });
            Ok(match started {
                Started::Now => Reply::Started,
                Started::Before => Reply::Known,
            })
        }
        Op::Signal { run, signal } => {
            if relay.abort(run, &format!("stopped by signal {signal}")) {
                return Ok(Reply::Done);
            }
            runner.signal(run, signal).map(|sent| if sent { Reply::Done } else { Reply::NotYet })
        }
        Op::Forget { run } => {
            relay.abort(run, "forgotten by the head");
            relay.forget(run);
            let r = runner.clone();
            let _ = tokio::task::spawn_blocking(move || r.forget(run)).await;
            cursors.remove(&run);
            Ok(Reply::Done)
        }
        Op::Hsm { requests } => match mover {
            Some(m) => {
                m.start(requests);
                Ok(Reply::Done)
            }
            None => Err("this agent is not an HSM mover (start it with --mover)".into()),
        },
        Op::HsmCancel { cookie } => {
            if let Some(m) = mover {
                m.cancel(cookie);
            }
            Ok(Reply::Done)
        }
        op => Err(format!("{op:?} is answered elsewhere")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_answers_are_kept_and_bounded() {
        let mut d = Done::default();
        d.put(1, Ok(Reply::Pong));
        assert_eq!(d.get(1), Some(Ok(Reply::Pong)));
        for i in 2..(DONE_KEPT as u64 + 10) {
            d.put(i, Ok(Reply::Pong));
        }
        assert_eq!(d.get(1), None);
        assert!(d.answers.len() <= DONE_KEPT);
    }
}
