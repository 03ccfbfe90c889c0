//! The cluster model the head owns: nodes, their links to agents, drains and groups.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use clusterfs_fs::{Errno, FsError};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::config::HeadConfig;
use crate::head::store::{Store, StoreError};
use crate::nodeset::{NodeSet, NodeSetError};
use crate::proto::{Message, NodeLive, Op, Reply, epoch_ns, from_epoch_ns};
use crate::sitrep::Report;

/// Requests waiting for an answer, by id: the connection they went to, and the waiter.
type Pending = DashMap<u64, (u64, oneshot::Sender<Result<Reply, String>>)>;

/// The live connection of one node's agent.
#[derive(Debug, Clone)]
pub struct Link {
    /// Distinguishes this connection from a later one of the same node.
    pub conn: u64,
    pub tx: mpsc::Sender<Message>,
}

/// What the head knows of one node.
#[derive(Debug)]
struct NodeEntry {
    drain: Option<String>,
    report: Option<Report>,
    /// When the last report arrived.
    seen: Option<Instant>,
    seen_at: SystemTime,
    link: Option<Link>,
    /// Why the link went away, for `state`.
    gone: String,
    /// Where the agent takes relay connections (file copies), as it said after connecting.
    relay: Option<String>,
    changed: SystemTime,
}

/// What the store keeps of a node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct NodeRecord {
    drain: Option<String>,
}

/// A node's state as `state` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeState {
    Up,
    Down(String),
    Drained(String),
}

impl NodeState {
    pub fn word(&self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Down(_) => "down",
            NodeState::Drained(_) => "drained",
        }
    }

    /// `up`, `down <reason>`, `drained <reason>`.
    pub fn line(&self) -> String {
        match self {
            NodeState::Up => "up".into(),
            NodeState::Down(r) | NodeState::Drained(r) if r.is_empty() => self.word().into(),
            NodeState::Down(r) | NodeState::Drained(r) => format!("{} {r}", self.word()),
        }
    }
}

/// A node's state: down while its agent's link is gone (`gone` says why) or its reports are
/// late, else drained or up. `since_report` is none until a report comes.
fn state_from(gone: Option<&str>, since_report: Option<Duration>, limit: Duration, drain: Option<&str>) -> NodeState {
    let up = match (gone, since_report) {
        (Some(why), _) => Err(why.to_string()),
        (None, Some(age)) if age <= limit => Ok(()),
        (None, Some(age)) => Err(format!("no report for {:.1} s", age.as_secs_f64())),
        (None, None) => Err("connected, no report yet".into()),
    };
    match (up, drain) {
        (Err(reason), _) => NodeState::Down(reason),
        (Ok(()), Some(reason)) => NodeState::Drained(reason.to_string()),
        (Ok(()), None) => NodeState::Up,
    }
}

/// Which folded set `nodes/<set>` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    All,
    Up,
    Down,
    Drained,
}

impl Which {
    /// Whether a node in `state` is in this set.
    pub fn holds(self, state: &NodeState) -> bool {
        matches!(
            (self, state),
            (Which::All, _)
                | (Which::Up, NodeState::Up)
                | (Which::Down, NodeState::Down(_))
                | (Which::Drained, NodeState::Drained(_))
        )
    }
}

/// The up, undrained node with the lowest load index among `views` (ties go to the first).
pub fn best_of(views: impl IntoIterator<Item = NodeView>) -> Option<String> {
    views
        .into_iter()
        .filter(|v| v.state == NodeState::Up)
        .min_by(|a, b| a.report.load_index().total_cmp(&b.report.load_index()))
        .map(|v| v.name)
}

/// A snapshot of one node for rendering.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub name: String,
    pub state: NodeState,
    pub report: Report,
    pub age_s: f64,
    pub seen_at: SystemTime,
    pub changed: SystemTime,
}

impl NodeView {
    /// The node as the leading head sent it `received` ago, aged since.
    pub fn from_live(live: &NodeLive, received: Instant) -> NodeView {
        let age = Duration::from_millis(live.age_ms) + received.elapsed();
        let since_report = live.reported.then_some(age);
        let limit = Duration::from_millis(live.limit_ms);
        NodeView {
            name: live.name.clone(),
            state: state_from(live.gone.as_deref(), since_report, limit, live.drain.as_deref()),
            report: live.report.clone().unwrap_or_default(),
            age_s: age.as_secs_f64(),
            seen_at: from_epoch_ns(live.seen_at_ns),
            changed: from_epoch_ns(live.changed_ns),
        }
    }
}

/// Changes of nodes kept for a following head's peer link that is slow to send them; one
/// that falls further behind is sent every node again.
const CHANGES_KEPT: usize = 4096;

/// The cluster model.
#[derive(Debug)]
pub struct Cluster {
    pub cfg: HeadConfig,
    store: Store,
    nodes: DashMap<String, NodeEntry>,
    groups: DashMap<String, String>,
    pending: Arc<Pending>,
    next_id: AtomicU64,
    started: Instant,
    pub started_at: SystemTime,
    /// Names of nodes whose state changed, for following heads.
    changes: broadcast::Sender<String>,
}

impl Cluster {
    /// Loads the model from the store.
    pub fn load(cfg: HeadConfig, store: Store) -> Result<Cluster, StoreError> {
        let now = SystemTime::now();
        let nodes = DashMap::new();
        for (name, rec) in store.scan::<NodeRecord>("nodes")? {
            nodes.insert(
                name,
                NodeEntry {
                    drain: rec.drain,
                    report: None,
                    seen: None,
                    seen_at: now,
                    link: None,
                    gone: "no report since the head started".into(),
                    relay: None,
                    changed: now,
                },
            );
        }
        let groups = store.scan::<String>("groups")?.into_iter().collect();
        Ok(Cluster {
            cfg,
            store,
            nodes,
            groups,
            pending: Arc::default(),
            // Ids must not repeat across head restarts: agents remember answers by id.
            next_id: AtomicU64::new(
                now.duration_since(SystemTime::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64) << 8,
            ),
            started: Instant::now(),
            started_at: now,
            changes: broadcast::channel(CHANGES_KEPT).0,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn interval(&self) -> Duration {
        Duration::from_millis(self.cfg.interval_ms)
    }

    fn limit(&self) -> Duration {
        self.interval() * self.cfg.missed_intervals
    }

    fn state_of(&self, e: &NodeEntry) -> NodeState {
        let gone = e.link.is_none().then_some(e.gone.as_str());
        state_from(gone, e.seen.map(|s| s.elapsed()), self.limit(), e.drain.as_deref())
    }

    /// Tells following heads that node `name` changed (nobody listens while none follows).
    fn changed(&self, name: &str) {
        if self.changes.receiver_count() > 0 {
            let _ = self.changes.send(name.to_string());
        }
    }

    /// Names of nodes as they change, from now on.
    pub fn changes(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// Node `name` as a following head is told of it; none once it is forgotten.
    pub fn live(&self, name: &str) -> Option<NodeLive> {
        self.nodes.get(name).map(|e| NodeLive {
            name: name.to_string(),
            report: e.report.clone(),
            reported: e.seen.is_some(),
            age_ms: e.seen.unwrap_or(self.started).elapsed().as_millis() as u64,
            gone: e.link.is_none().then(|| e.gone.clone()),
            drain: e.drain.clone(),
            limit_ms: self.limit().as_millis() as u64,
            seen_at_ns: epoch_ns(e.seen_at),
            changed_ns: epoch_ns(e.changed),
        })
    }

    /// Whether node `name` has not reported since this head started, while its agent may
    /// still be redialling (the longest redial wait with its jitter, then a report's limit):
    /// a node the head has not heard from yet is not known to be down.
    pub fn awaited(&self, name: &str) -> bool {
        let grace = crate::proto::REDIAL_MAX * 5 / 4 + self.interval() * self.cfg.missed_intervals;
        self.started.elapsed() < grace && self.nodes.get(name).is_some_and(|e| e.seen.is_none())
    }

    pub fn exists(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    /// All known node names, in nodeset order.
    pub fn names(&self) -> Vec<String> {
        self.set(Which::All).iter().collect()
    }

    pub fn set(&self, which: Which) -> NodeSet {
        let mut set = NodeSet::new();
        for e in self.nodes.iter() {
            if which == Which::All || which.holds(&self.state_of(e.value())) {
                // Names were checked when the agent connected; they always fit a nodeset.
                let _ = set.insert(e.key());
            }
        }
        set
    }

    pub fn view(&self, name: &str) -> Option<NodeView> {
        self.nodes.get(name).map(|e| NodeView {
            name: name.to_string(),
            state: self.state_of(&e),
            report: e.report.clone().unwrap_or_default(),
            age_s: e.seen.unwrap_or(self.started).elapsed().as_secs_f64(),
            seen_at: e.seen_at,
            changed: e.changed,
        })
    }

    /// Node `name`'s state and when it last changed, without copying its report.
    pub fn state(&self, name: &str) -> Option<(NodeState, SystemTime)> {
        self.nodes.get(name).map(|e| (self.state_of(&e), e.changed))
    }

    /// The up, undrained node with the lowest load index (ties go to the first name).
    pub fn best(&self) -> Option<String> {
        best_of(self.names().into_iter().filter_map(|n| self.view(&n)))
    }

    /// Forgets node `name` (decommissioned): its record leaves the store and it leaves every
    /// set. Refused while its agent is connected. An agent that connects later makes it anew.
    pub fn forget(&self, name: &str) -> Result<(), FsError> {
        let connected = || {
            FsError::new(
                Errno::Busy,
                format!("{name}'s agent is connected: stop it first (drain keeps a node out of placement)"),
            )
        };
        let (_, entry) = match self.nodes.remove_if(name, |_, e| e.link.is_none()) {
            Some(removed) => removed,
            None if self.nodes.contains_key(name) => return Err(connected()),
            None => return Err(FsError::not_found(format!("node {name}"))),
        };
        if let Err(e) = self.store.delete("nodes", name) {
            // Not forgotten after all: the node stays as it was, unless its agent came back.
            self.nodes.entry(name.to_string()).or_insert(entry);
            return Err(e.into());
        }
        info!(node = name, "node forgotten");
        self.changed(name);
        Ok(())
    }

    pub fn drain(&self, name: &str, reason: &str) -> Result<(), FsError> {
        self.set_drain(name, Some(reason.to_string()))
    }

    pub fn resume(&self, name: &str) -> Result<(), FsError> {
        self.set_drain(name, None)
    }

    fn set_drain(&self, name: &str, drain: Option<String>) -> Result<(), FsError> {
        self.store.put("nodes", name, &NodeRecord { drain: drain.clone() }).map_err(FsError::from)?;
        let mut e = self.nodes.get_mut(name).ok_or_else(|| FsError::not_found(format!("node {name}")))?;
        info!(node = name, ?drain, "drain state changed");
        e.drain = drain;
        e.changed = SystemTime::now();
        drop(e);
        self.changed(name);
        Ok(())
    }

    /// Binds a newly authenticated agent connection to its node. A second agent may not take
    /// the name of a node whose agent is alive; one whose reports stopped is replaced.
    pub fn attach(&self, name: &str, link: Link) -> Result<(), String> {
        let now = SystemTime::now();
        let mut fresh = false;
        let mut e = self.nodes.entry(name.to_string()).or_insert_with(|| {
            fresh = true;
            NodeEntry {
                drain: None,
                report: None,
                seen: None,
                seen_at: now,
                link: None,
                gone: String::new(),
                relay: None,
                changed: now,
            }
        });
        if let Some(old) = &e.link {
            let alive = e.seen.is_some_and(|s| s.elapsed() < self.interval() * 2);
            if alive {
                return Err(format!("node {name} is already connected from a live agent"));
            }
            warn!(node = name, old = old.conn, new = link.conn, "replacing a silent agent connection");
        }
        e.link = Some(link);
        e.seen = None;
        e.changed = now;
        drop(e);
        self.changed(name);
        if fresh {
            if let Err(err) = self.store.put("nodes", name, &NodeRecord::default()) {
                warn!(node = name, error = %err, "could not record the new node");
            }
        }
        Ok(())
    }

    /// Where `name`'s agent takes relay connections, as said on connection `conn`.
    pub fn set_relay(&self, name: &str, conn: u64, addr: String) {
        if let Some(mut e) = self.nodes.get_mut(name)
            && e.link.as_ref().is_some_and(|l| l.conn == conn)
        {
            e.relay = Some(addr);
        }
    }

    /// Where `name`'s agent takes relay connections, while it is connected.
    pub fn relay(&self, name: &str) -> Option<String> {
        self.nodes.get(name).filter(|e| e.link.is_some()).and_then(|e| e.relay.clone())
    }

    /// The connection `conn` of `name` ended.
    pub fn detach(&self, name: &str, conn: u64, why: &str) {
        if let Some(mut e) = self.nodes.get_mut(name) {
            if e.link.as_ref().is_some_and(|l| l.conn == conn) {
                e.link = None;
                e.gone = why.to_string();
                e.changed = SystemTime::now();
                drop(e);
                self.changed(name);
            }
        }
    }

    pub fn report(&self, name: &str, conn: u64, report: Report) {
        if let Some(mut e) = self.nodes.get_mut(name) {
            if e.link.as_ref().is_some_and(|l| l.conn == conn) {
                if e.seen.is_none() {
                    e.changed = SystemTime::now();
                }
                e.report = Some(report);
                e.seen = Some(Instant::now());
                e.seen_at = SystemTime::now();
                drop(e);
                self.changed(name);
            }
        }
    }

    /// The link a request to `name` goes out on, or why none goes out now.
    fn link(&self, name: &str) -> Result<(mpsc::Sender<Message>, u64), FsError> {
        let e = self.nodes.get(name).ok_or_else(|| FsError::not_found(format!("node {name}")))?;
        // A node that has just connected and not reported yet can be asked already.
        match (self.state_of(&e), &e.link) {
            (_, Some(link)) if e.seen.is_none() => Ok((link.tx.clone(), link.conn)),
            (NodeState::Down(reason), _) => {
                Err(FsError::new(Errno::HostDown, format!("node {name} is down ({reason})")))
            }
            (_, Some(link)) => Ok((link.tx.clone(), link.conn)),
            (_, None) => Err(FsError::new(Errno::HostDown, format!("node {name} is down"))),
        }
    }

    /// Whether a request to `name` would go out now.
    pub fn reachable(&self, name: &str) -> bool {
        self.link(name).is_ok()
    }

    /// Sends `op` to `name`'s agent and waits for its answer.
    pub async fn request(&self, name: &str, op: Op, timeout: Duration) -> Result<Reply, FsError> {
        self.try_request(name, op, timeout).await?
    }

    /// As [`Cluster::request`], but tells apart a request that never left (the outer error:
    /// the agent surely did not get it) from one sent whose answer did not come.
    pub async fn try_request(&self, name: &str, op: Op, timeout: Duration) -> Result<Result<Reply, FsError>, FsError> {
        let (tx, link) = self.link(name)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        self.pending.insert(id, (link, done));
        if tx.send(Message::Request { id, op }).await.is_err() {
            self.pending.remove(&id);
            return Err(FsError::new(Errno::HostDown, format!("node {name}: the connection (#{link}) closed")));
        }
        let out = tokio::time::timeout(timeout, answer).await;
        self.pending.remove(&id);
        Ok(match out {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(message))) => Err(FsError::new(Errno::Io, format!("node {name}: {message}"))),
            Ok(Err(_)) => Err(FsError::new(Errno::HostDown, format!("node {name}: the connection closed"))),
            Err(_) => Err(FsError::new(Errno::TimedOut, format!("node {name} did not answer within {timeout:?}"))),
        })
    }

    /// Sends `msg` to `name`'s agent if it is connected, without waiting for an answer.
    pub async fn tell(&self, name: &str, msg: Message) -> bool {
        let tx = self.nodes.get(name).and_then(|e| e.link.as_ref().map(|l| l.tx.clone()));
        match tx {
            Some(tx) => tx.send(msg).await.is_ok(),
            None => false,
        }
    }

    /// Delivers an agent's answer to whoever waits for it, if the request went to that
    /// agent's connection `conn`: an agent cannot answer for another node.
    pub fn answered(&self, node: &str, conn: u64, id: u64, result: Result<Reply, String>) {
        match self.pending.remove_if(&id, |_, (to, _)| *to == conn) {
            Some((_, (_, tx))) => {
                let _ = tx.send(result);
            }
            None if self.pending.contains_key(&id) => {
                warn!(node, conn, request = id, "answer to a request sent to another node ignored")
            }
            None => debug!(node, request = id, "answer to a request no longer waited for"),
        }
    }

    /// Groups, by name.
    pub fn group_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.groups.iter().map(|g| g.key().clone()).collect();
        v.sort();
        v
    }

    pub fn group(&self, name: &str) -> Option<String> {
        self.groups.get(name).map(|g| g.clone())
    }

    /// Parses a nodeset with this cluster's groups and limit.
    pub fn nodeset(&self, text: &str) -> Result<NodeSet, NodeSetError> {
        let groups = |n: &str| self.group(n);
        NodeSet::parse_with(text, &groups, self.cfg.nodeset_limit)
    }

    /// Sets group `name` to the nodeset `text` (stored folded).
    pub fn set_group(&self, name: &str, text: &str) -> Result<(), FsError> {
        let set = self.nodeset(text).map_err(|e| FsError::invalid(e.to_string()))?;
        let folded = set.fold();
        self.store.put("groups", name, &folded).map_err(FsError::from)?;
        self.groups.insert(name.to_string(), folded);
        Ok(())
    }

    pub fn remove_group(&self, name: &str) -> Result<(), FsError> {
        if !self.groups.contains_key(name) {
            return Err(FsError::not_found(format!("group {name}")));
        }
        self.store.delete("groups", name).map_err(FsError::from)?;
        self.groups.remove(name);
        Ok(())
    }

    /// One line per subsystem with its counts, for `/cluster/status`.
    pub fn status(&self) -> String {
        let count = |w| self.set(w).len();
        format!(
            "nodes all={} up={} down={} drained={}\ngroups {}\n",
            count(Which::All),
            count(Which::Up),
            count(Which::Down),
            count(Which::Drained),
            self.groups.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Op, Reply};

    #[tokio::test]
    async fn only_the_connection_a_request_went_to_can_answer_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store.redb")).unwrap();
        let cluster = Arc::new(Cluster::load(HeadConfig::default(), store).unwrap());
        let (tx1, mut rx1) = mpsc::channel(4);
        let (tx2, _rx2) = mpsc::channel(4);
        cluster.attach("cn1", Link { conn: 1, tx: tx1 }).unwrap();
        cluster.attach("cn2", Link { conn: 2, tx: tx2 }).unwrap();
        let asking = tokio::spawn({
            let cluster = cluster.clone();
            async move { cluster.request("cn1", Op::Ping, Duration::from_secs(5)).await }
        });
        let Some(Message::Request { id, .. }) = rx1.recv().await else { panic!("no request reached cn1") };
        // cn2's agent answers cn1's request: ignored, the request still waits.
        cluster.answered("cn2", 2, id, Err("forged".into()));
        assert!(cluster.pending.contains_key(&id));
        cluster.answered("cn1", 1, id, Ok(Reply::Pong));
        assert!(matches!(asking.await.unwrap(), Ok(Reply::Pong)));
    }
}
