//! One node identity's connection to the head: dial, authenticate, report, answer; redial on loss.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clusterfs::auth::{Secret, agent_handshake};
use clusterfs::proto::{Conn, Message, Op, ProtoError, Reply};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::probe::Shared;

/// Settings shared by every identity of one agent process.
#[derive(Debug)]
pub struct LinkConfig {
    pub heads: Vec<String>,
    pub secret: Secret,
    pub max_frame: usize,
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

/// Runs `node`'s link forever, redialling with exponential backoff (100 ms to 5 s, jittered).
pub async fn run(node: String, cfg: Arc<LinkConfig>, probe: Arc<Mutex<Shared>>) {
    let mut backoff = Duration::from_millis(100);
    let mut done = Done::default();
    let mut next_head = 0usize;
    loop {
        let head = &cfg.heads[next_head % cfg.heads.len()];
        match session(&node, head, &cfg, &probe, &mut done).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(ProtoError::Refused(reason)) => warn!(node, head, reason, "refused by the head"),
            Err(e) => debug!(node, head, error = %e, "link lost"),
        }
        next_head += 1;
        let jitter = Duration::from_millis(rand_jitter(backoff.as_millis() as u64 / 4 + 1));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn rand_jitter(max: u64) -> u64 {
    // Spread the redials of many identities; the clock's nanoseconds are random enough here.
    let n =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::from(d.subsec_nanos()));
    n % max
}

/// One connection, until it fails. Ok(()) when it was established and then ended.
async fn session(
    node: &str,
    head: &str,
    cfg: &LinkConfig,
    probe: &Arc<Mutex<Shared>>,
    done: &mut Done,
) -> Result<(), ProtoError> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(head))
        .await
        .map_err(|_| ProtoError::Timeout("the connection"))??;
    let _ = stream.set_nodelay(true);
    let mut conn = Conn::new(stream, cfg.max_frame);
    let interval_ms = tokio::time::timeout(Duration::from_secs(5), agent_handshake(&mut conn, &cfg.secret, node))
        .await
        .map_err(|_| ProtoError::Timeout("the handshake"))??;
    let interval = Duration::from_millis(interval_ms.max(10));
    info!(node, head, interval_ms, "connected");
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let report = probe.lock().expect("probe lock is never poisoned: sampling does not panic").report(interval / 2);
                conn.send(&Message::Sitrep { report }).await?;
            }
            msg = conn.recv() => match msg? {
                Message::Request { id, op } => {
                    let answer = match done.get(id) {
                        Some(a) => a,
                        None => {
                            let a = execute(op);
                            done.put(id, a.clone());
                            a
                        }
                    };
                    conn.send(&Message::Response { id, result: answer }).await?;
                }
                other => return Err(ProtoError::Unexpected { expected: "a request", got: other.name().into() }),
            },
        }
    }
}

fn execute(op: Op) -> Result<Reply, String> {
    match op {
        Op::Ping => Ok(Reply::Pong),
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
