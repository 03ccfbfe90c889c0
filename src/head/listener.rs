//! Accepts agent connections: authenticate, bind to a node, then relay reports and answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::{Secret, head_handshake};
use crate::head::Core;
use crate::head::cluster::Link;
use crate::head::jobs::Stray;
use crate::head::lead::Candidate;
use crate::head::peer::{self, PEER_PREFIX};
use crate::names;
use crate::proto::{Conn, Frame, Message, ProtoError};

/// How long an agent has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a following head holds a new connection while it looks for the leading head
/// (less than an agent's handshake timeout, so the agent redials rather than gives up).
const HOLD_FOR_LEADER: Duration = Duration::from_secs(4);

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// What this head is to a new connection: its cluster once it leads; until then, where the
/// leading head is.
#[derive(Debug, Clone)]
pub struct Roles {
    pub core: watch::Receiver<Option<Arc<Core>>>,
    pub leader: watch::Receiver<Option<Candidate>>,
    /// Where this head is reached, to know itself in the election.
    pub me: String,
}

/// Serves agents and following heads on `listener` until the task is dropped; while another
/// head leads, connections are passed through to it.
pub async fn serve(roles: Roles, listener: TcpListener, secret: Arc<Secret>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
                let span = info_span!("agent", conn, %peer);
                let core = roles.core.borrow().clone();
                match core {
                    Some(core) => tokio::spawn(handle(core, stream, secret.clone(), conn).instrument(span)),
                    None => tokio::spawn(pass(roles.clone(), stream, secret.clone(), conn).instrument(span)),
                };
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A connection to a following head: passed through, byte for byte, to the leading head, until
/// either side closes or another head leads. It is served here if this head leads meanwhile.
async fn pass(mut roles: Roles, mut stream: TcpStream, secret: Arc<Secret>, conn: u64) {
    let deadline = Instant::now() + HOLD_FOR_LEADER;
    loop {
        let core = roles.core.borrow().clone();
        if let Some(core) = core {
            return handle(core, stream, secret, conn).await;
        }
        let leader = roles.leader.borrow_and_update().clone();
        if let Some(leader) = leader.filter(|l| l.addr != roles.me) {
            let dialled = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(&leader.addr)).await;
            if let Ok(Ok(mut upstream)) = dialled {
                let _ = upstream.set_nodelay(true);
                debug!(leader = leader.name, "passing a connection to the leading head");
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut stream, &mut upstream) => {
                        debug!(result = ?r, "passed connection closed");
                    }
                    _ = roles.leader.changed() => debug!("another head leads: closing a passed connection"),
                }
                return;
            }
        }
        if Instant::now() >= deadline {
            return debug!("no leading head to pass a connection to");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An agent's or a following head's connection to the leading head.
async fn handle(core: Arc<Core>, stream: TcpStream, secret: Arc<Secret>, conn_id: u64) {
    let (cluster, jobs, hsm, vms) = (&core.cluster, &core.jobs, &core.hsm, &core.vms);
    let _ = stream.set_nodelay(true);
    let mut conn = Conn::new(stream, cluster.cfg.max_frame);
    let valid = |n: &str| match n.strip_prefix(PEER_PREFIX) {
        Some(head) => names::check("head", head),
        None => names::check("node", n),
    };
    let peer = match tokio::time::timeout(HANDSHAKE_TIMEOUT, head_handshake(&mut conn, &secret, valid)).await {
        Ok(Ok(peer)) => peer,
        Ok(Err(e)) => return warn!(error = %e, "agent refused"),
        Err(_) => return warn!("agent refused: handshake timed out"),
    };
    if let Some(head) = peer.node.strip_prefix(PEER_PREFIX) {
        if conn.send(&Message::Welcome { interval_ms: cluster.cfg.interval_ms }).await.is_err() {
            return;
        }
        info!(head, "following head connected");
        return peer::serve(core.view.clone(), cluster.clone(), conn, conn_id, cluster.cfg.max_frame).await;
    }
    let node = peer.node;
    let (tx, mut rx) = mpsc::channel::<Message>(256);
    if let Err(reason) = cluster.attach(&node, Link { conn: conn_id, tx }) {
        warn!(node, reason, "agent refused");
        let _ = conn.send(&Message::Refused { reason }).await;
        return;
    }
    if conn.send(&Message::Welcome { interval_ms: cluster.cfg.interval_ms }).await.is_err() {
        return cluster.detach(&node, conn_id, "disconnected during the handshake");
    }
    info!(node, version = peer.agent_version, "agent connected");
    // Frames about runs this node does not have: ignored, the first logged, all counted.
    let mut strays = 0u64;
    let mut stray = |run: u64, what: &str| -> Vec<Message> {
        strays += 1;
        if strays == 1 {
            warn!(node, run, what, "frame about a run this node does not have ignored (further ones are counted)");
        }
        Vec::new()
    };
    // The agent takes a head it does not hear from for a while for dead.
    let mut beat = tokio::time::interval(Duration::from_millis(cluster.cfg.interval_ms));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let why = loop {
        tokio::select! {
            _ = beat.tick() => if let Err(e) = conn.send(&Message::Beat).await {
                break format!("connection error: {e}");
            },
            frame = conn.recv_frame() => {
                let answer = match frame {
                    Ok(Frame::Message(Message::Sitrep { report })) => {
                        cluster.report(&node, conn_id, report);
                        Vec::new()
                    }
                    Ok(Frame::Message(Message::Response { id, result })) => {
                        cluster.answered(&node, conn_id, id, result);
                        Vec::new()
                    }
                    Ok(Frame::Message(Message::Runs { runs })) => jobs.reconcile(&node, runs),
                    Ok(Frame::Message(Message::Exited { run, exit, len })) => match jobs.exited(&node, run, exit, len) {
                        Ok(answer) => answer.into_iter().collect(),
                        Err(Stray) => stray(run, "exit"),
                    },
                    Ok(Frame::Message(Message::Vms { vms: list })) => vms.report(&node, list),
                    Ok(Frame::Bulk { stream, offset, data }) if stream & crate::vms::CONSOLE_STREAM != 0 => {
                        vms.console(&node, stream & !crate::vms::CONSOLE_STREAM, offset, &data);
                        Vec::new()
                    }
                    Ok(Frame::Bulk { stream, offset, data }) => match jobs.output(&node, stream, offset, &data) {
                        Ok(answer) => answer.into_iter().collect(),
                        Err(Stray) => stray(crate::jobs::split_stream(stream).0, "output"),
                    },
                    Ok(Frame::Message(Message::Relay { addr })) => {
                        cluster.set_relay(&node, conn_id, addr);
                        Vec::new()
                    }
                    Ok(Frame::Message(Message::Progress { run, bytes })) => {
                        jobs.progress(&node, run, bytes);
                        Vec::new()
                    }
                    Ok(Frame::Message(Message::Mover { info, held })) => {
                        hsm.mover_hello(&node, conn_id, info, held);
                        Vec::new()
                    }
                    Ok(Frame::Message(Message::HsmProgress { cookie, bytes, total })) => {
                        hsm.progress(&node, cookie, bytes, total);
                        Vec::new()
                    }
                    Ok(Frame::Message(Message::HsmDone { cookie, status })) => {
                        hsm.done(&node, cookie, status);
                        Vec::new()
                    }
                    Ok(Frame::Chunk { .. }) => break "protocol violation: a file chunk on the control link".to_string(),
                    Ok(Frame::Message(other)) => break format!("protocol violation: unexpected {}", other.name()),
                    // A closed connection, or one reset because the agent died with a beat
                    // unread: the same end for whoever reads the node's state.
                    Err(ProtoError::Closed) => break "agent disconnected".to_string(),
                    Err(ProtoError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        break "agent disconnected".to_string();
                    }
                    Err(e) => break format!("connection error: {e}"),
                };
                let mut failed = None;
                for msg in answer {
                    if let Err(e) = conn.send(&msg).await {
                        failed = Some(format!("connection error: {e}"));
                        break;
                    }
                }
                if let Some(why) = failed {
                    break why;
                }
            },
            out = rx.recv() => match out {
                Some(msg) => if let Err(e) = conn.send(&msg).await {
                    break format!("connection error: {e}");
                },
                None => break "replaced by a new connection".to_string(),
            },
        }
    };
    if strays > 1 {
        warn!(node, strays, "frames about runs this node does not have were ignored");
    }
    if why.starts_with("protocol") || why.starts_with("connection error") {
        warn!(node, why, "agent connection closed");
    } else {
        debug!(node, why, "agent connection closed");
    }
    hsm.detach(&node, conn_id);
    cluster.detach(&node, conn_id, &why);
}
