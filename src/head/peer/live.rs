//! Nodes' live state on peer links: the leading head sends it as it changes, and a following head serves `nodes/<node>/sitrep` and `state` from its table of it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use dashmap::DashMap;
use tokio::net::TcpStream;
use tokio::sync::broadcast::{self, error::TryRecvError};

use clusterfs_fs::Node;

use crate::head::cluster::{Cluster, NodeView};
use crate::proto::{Conn, Message, NodeLive, ProtoError, epoch_ns, from_epoch_ns};

/// Nodes in one message at most, and a bound by the frame size (a node is under 2 KiB).
const NODES_PER_MESSAGE: usize = 256;

/// One message of nodes as they are now.
fn message(cluster: &Cluster, nodes: Vec<NodeLive>, gone: Vec<String>, reset: bool, complete: bool) -> Message {
    Message::Live { nodes, gone, reset, complete, started_ns: epoch_ns(cluster.started_at) }
}

/// How many nodes one message may carry on links of frames up to `max_frame` bytes.
fn per_message(max_frame: usize) -> usize {
    (max_frame / 8192).clamp(1, NODES_PER_MESSAGE)
}

/// Sends every node, the first message telling the following head to forget what it held.
pub async fn send_all(cluster: &Cluster, conn: &mut Conn<TcpStream>, max_frame: usize) -> Result<(), ProtoError> {
    let names = cluster.names();
    let parts: Vec<&[String]> = names.chunks(per_message(max_frame)).collect();
    if parts.is_empty() {
        return conn.send(&message(cluster, Vec::new(), Vec::new(), true, true)).await;
    }
    for (i, part) in parts.iter().enumerate() {
        let nodes = part.iter().filter_map(|n| cluster.live(n)).collect();
        conn.send(&message(cluster, nodes, Vec::new(), i == 0, i + 1 == parts.len())).await?;
    }
    Ok(())
}

/// Sends the nodes changed since the last call, `first` among them and as many more as
/// are waiting (up to a message's worth); every node when the link fell too far behind.
pub async fn send_changes(
    cluster: &Cluster,
    changes: &mut broadcast::Receiver<String>,
    first: String,
    conn: &mut Conn<TcpStream>,
    max_frame: usize,
) -> Result<(), ProtoError> {
    let mut names = BTreeSet::from([first]);
    while names.len() < per_message(max_frame) {
        match changes.try_recv() {
            Ok(name) => {
                names.insert(name);
            }
            Err(TryRecvError::Lagged(_)) => return send_all(cluster, conn, max_frame).await,
            Err(_) => break,
        }
    }
    let (mut nodes, mut gone) = (Vec::new(), Vec::new());
    for name in names {
        match cluster.live(&name) {
            Some(live) => nodes.push(live),
            None => gone.push(name),
        }
    }
    conn.send(&message(cluster, nodes, gone, false, false)).await
}

/// What a following head holds of the leading head's nodes, over one peer link.
#[derive(Debug)]
pub struct LiveTable {
    /// Each node as last sent, and when it came.
    nodes: DashMap<String, (NodeLive, Instant)>,
    /// The link it came over is gone: nothing more comes.
    closed: Arc<AtomicBool>,
    /// When the leading head started (ns since the epoch): its directories date from then.
    started_ns: AtomicU64,
    /// Every node has been sent since the last reset.
    complete: AtomicBool,
    /// Nodes dropped since a change to them was answered, until they are sent again: while
    /// there are any, what was sent is not the whole cluster.
    stale: dashmap::DashSet<String>,
}

impl LiveTable {
    pub fn new(closed: Arc<AtomicBool>) -> LiveTable {
        LiveTable {
            nodes: DashMap::new(),
            closed,
            started_ns: AtomicU64::new(0),
            complete: AtomicBool::new(false),
            stale: dashmap::DashSet::new(),
        }
    }

    /// Takes in one message of the leading head.
    pub fn apply(&self, nodes: Vec<NodeLive>, gone: Vec<String>, reset: bool, complete: bool, started_ns: u64) {
        self.started_ns.store(started_ns, Ordering::Relaxed);
        if reset {
            self.complete.store(false, Ordering::Relaxed);
            self.nodes.clear();
            self.stale.clear();
        }
        let now = Instant::now();
        for live in nodes {
            self.stale.remove(&live.name);
            self.nodes.insert(live.name.clone(), (live, now));
        }
        for name in gone {
            self.stale.remove(&name);
            self.nodes.remove(&name);
        }
        if complete {
            self.complete.store(true, Ordering::Relaxed);
        }
    }

    /// A change of node `name` was answered: what was sent of it before may predate the
    /// change, so it is asked of the leading head until it sends the node again. (A change
    /// to a name it was never sent, such as a refused `mkdir`, leaves what it holds whole.)
    pub fn forget(&self, name: &str) {
        if self.nodes.remove(name).is_some() {
            self.stale.insert(name.to_string());
        }
    }

    /// Whether what the leading head sends comes in: its link is up, and it has sent.
    fn live(&self) -> bool {
        !self.closed.load(Ordering::Relaxed) && self.started_ns.load(Ordering::Relaxed) > 0
    }

    /// Node `name` as the leading head last sent it, aged since; none when it did not, or
    /// when the link is gone.
    pub fn view(&self, name: &str) -> Option<NodeView> {
        if !self.live() {
            return None;
        }
        self.nodes.get(name).map(|e| NodeView::from_live(&e.0, e.1))
    }

    /// Whether the leading head sent node `name`, and what it sent still holds.
    pub fn has(&self, name: &str) -> bool {
        self.live() && self.nodes.contains_key(name)
    }

    /// Whether what the leading head sent is the whole cluster.
    pub fn is_whole(&self) -> bool {
        self.live() && self.complete.load(Ordering::Relaxed) && self.stale.is_empty()
    }

    /// Every node's name in nodeset order, when what was sent is the whole cluster.
    pub fn names(&self) -> Option<Vec<String>> {
        if !self.is_whole() {
            return None;
        }
        let mut set = crate::nodeset::NodeSet::new();
        for e in self.nodes.iter() {
            // Names were checked when the agent connected; they always fit a nodeset.
            let _ = set.insert(e.key());
        }
        Some(set.iter().collect())
    }

    /// Every node as the leading head last sent it, when that is the whole cluster.
    pub fn whole(&self) -> Option<Vec<NodeView>> {
        self.is_whole().then(|| self.nodes.iter().map(|e| NodeView::from_live(&e.0, e.1)).collect())
    }

    /// `nodes/`, and `nodes/<name>/` of a node the leading head sent, as it has them.
    pub fn dir(&self, name: Option<&str>) -> Option<Node> {
        match name {
            None if self.live() => crate::view::root_node("nodes"),
            Some(name) if self.has(name) => self.root(),
            _ => None,
        }
    }

    /// The tree's root as the leading head has it (dated from its start), once it has sent
    /// anything: the same on every head, and looked at by every path walk.
    pub fn root(&self) -> Option<Node> {
        let started = self.started_ns.load(Ordering::Relaxed);
        (started > 0).then(|| Node::dir().mtime(from_epoch_ns(started)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::head::cluster::NodeState;

    /// Node `name` as the leading head sends it, with a report just made (50 ms make it down).
    fn sent(name: &str, gone: Option<&str>, drain: Option<&str>) -> NodeLive {
        NodeLive {
            name: name.into(),
            report: Some(crate::sitrep::Report::default()),
            reported: true,
            age_ms: 0,
            gone: gone.map(Into::into),
            drain: drain.map(Into::into),
            limit_ms: 50,
            seen_at_ns: 1,
            changed_ns: 1,
        }
    }

    #[test]
    fn nodes_sent_age_into_down_and_what_a_change_or_a_reset_or_a_closed_link_makes_stale_is_not_served() {
        let closed = Arc::new(AtomicBool::new(false));
        let table = LiveTable::new(closed.clone());
        assert!(table.dir(None).is_none(), "served before the leading head sent anything");
        // Every node, in two parts: the cluster is whole once the second has come.
        table.apply(vec![sent("cn1", None, None)], vec![], true, false, 1);
        assert!(!table.is_whole());
        table.apply(vec![sent("cn2", Some("agent disconnected"), None)], vec![], false, true, 1);
        assert_eq!(table.whole().map(|v| v.len()), Some(2));
        assert_eq!(table.names(), Some(vec!["cn1".to_string(), "cn2".to_string()]));
        assert_eq!(table.view("cn1").unwrap().state, NodeState::Up);
        assert_eq!(table.view("cn2").unwrap().state.line(), "down agent disconnected");
        assert!(table.dir(None).is_some() && table.dir(Some("cn1")).is_some() && table.dir(Some("cn9")).is_none());
        // No report since: down here as on the leading head, though nothing more came.
        std::thread::sleep(Duration::from_millis(80));
        let line = table.view("cn1").unwrap().state.line();
        assert!(line.starts_with("down no report for 0."), "{line}");
        table.apply(vec![sent("cn1", None, Some("swap"))], vec!["cn2".into()], false, false, 1);
        assert_eq!(table.view("cn1").unwrap().state.line(), "drained swap");
        assert!(table.view("cn2").is_none(), "a forgotten node is still served");
        // A change to it answered: asked of the leading head until it sends the node again.
        // The folded sets too, as the cluster is not whole without it.
        table.forget("cn1");
        assert!(table.view("cn1").is_none() && table.dir(Some("cn1")).is_none());
        assert!(!table.is_whole(), "whole without a node whose change was answered");
        table.forget("cn9");
        table.apply(vec![sent("cn1", None, None)], vec![], false, false, 1);
        assert!(table.is_whole(), "a change to a name never sent made the rest stale");
        table.forget("cn1");
        table.apply(vec![sent("cn1", None, None)], vec![], false, false, 1);
        assert!(table.is_whole());
        table.apply(vec![sent("cn3", None, None)], vec![], true, false, 1);
        assert!(table.view("cn1").is_none(), "a reset kept a node not sent again");
        assert!(!table.is_whole(), "whole before the rest of a resend came");
        assert_eq!(table.view("cn3").unwrap().state, NodeState::Up);
        closed.store(true, Ordering::Relaxed);
        assert!(table.view("cn3").is_none() && table.dir(None).is_none(), "served after its link closed");
    }
}
