//! Accepts agent connections: authenticate, bind to a node, then relay reports and answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::{Secret, head_handshake};
use crate::head::cluster::{Cluster, Link};
use crate::head::hsm::Hsm;
use crate::head::jobs::{Jobs, Stray};
use crate::head::vms::Vms;
use crate::names;
use crate::proto::{Conn, Frame, Message, ProtoError};

/// How long an agent has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Serves agents on `listener` until the task is dropped.
pub async fn serve(
    cluster: Arc<Cluster>,
    jobs: Arc<Jobs>,
    hsm: Arc<Hsm>,
    vms: Arc<Vms>,
    listener: TcpListener,
    secret: Arc<Secret>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
                let span = info_span!("agent", conn, %peer);
                tokio::spawn(
                    handle(cluster.clone(), jobs.clone(), hsm.clone(), vms.clone(), stream, secret.clone(), conn)
                        .instrument(span),
                );
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(
    cluster: Arc<Cluster>,
    jobs: Arc<Jobs>,
    hsm: Arc<Hsm>,
    vms: Arc<Vms>,
    stream: TcpStream,
    secret: Arc<Secret>,
    conn_id: u64,
) {
    let _ = stream.set_nodelay(true);
    let mut conn = Conn::new(stream, cluster.cfg.max_frame);
    let peer =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, head_handshake(&mut conn, &secret, |n| names::check("node", n)))
            .await
        {
            Ok(Ok(peer)) => peer,
            Ok(Err(e)) => return warn!(error = %e, "agent refused"),
            Err(_) => return warn!("agent refused: handshake timed out"),
        };
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
    let why = loop {
        tokio::select! {
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
                    Err(ProtoError::Closed) => break "agent disconnected".to_string(),
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
