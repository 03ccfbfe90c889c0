//! `nodes/`: folded node sets, the best node, and per node its sitrep, state, ctl and ping.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clusterfs_fs::{Answer, Caller, Errno, FsError, Kind, Node, Result};

use super::{ERROR_FILE, FileSpec, README_FILE, Verb, blocking, command_text, readme, spec_node};
use crate::head::cluster::{Cluster, NodeView, Which, best_of};
use crate::nodeset::NodeSet;
use crate::proto::Op;
use crate::sitrep::Sitrep;

const SETS: &[(&str, Which)] =
    &[("all", Which::All), ("up", Which::Up), ("down", Which::Down), ("drained", Which::Drained)];

const DIR_FILES: &[FileSpec] = &[
    README_FILE,
    FileSpec { name: "all", kind: Kind::Snapshot, perm: 0o444, help: "every known node, folded: cn[0-3,5-9]" },
    FileSpec { name: "up", kind: Kind::Snapshot, perm: 0o444, help: "nodes up and not drained" },
    FileSpec { name: "down", kind: Kind::Snapshot, perm: 0o444, help: "nodes whose agent is gone or silent" },
    FileSpec { name: "drained", kind: Kind::Snapshot, perm: 0o444, help: "nodes up but drained" },
    FileSpec {
        name: "best",
        kind: Kind::Snapshot,
        perm: 0o444,
        help: "the up, undrained node with the lowest load_index",
    },
    ERROR_FILE,
];

pub const NODE_FILES: &[FileSpec] = &[
    README_FILE,
    FileSpec { name: "sitrep", kind: Kind::Snapshot, perm: 0o444, help: "`key value` lines in a fixed order" },
    FileSpec { name: "sitrep.json", kind: Kind::Snapshot, perm: 0o444, help: "the same as one JSON object" },
    FileSpec { name: "metrics", kind: Kind::Snapshot, perm: 0o444, help: "the same in Prometheus text format" },
    FileSpec { name: "state", kind: Kind::Snapshot, perm: 0o444, help: "up | down <reason> | drained <reason>" },
    FileSpec { name: "ctl", kind: Kind::Control, perm: 0o644, help: "root writes a verb below" },
    FileSpec { name: "jobs", kind: Kind::Snapshot, perm: 0o444, help: "ids of jobs running here, one per line" },
    FileSpec { name: "ping", kind: Kind::Snapshot, perm: 0o444, help: "a round trip to the agent at read: `0.21 ms`" },
    ERROR_FILE,
];

pub const VERBS: &[Verb] = &[
    Verb { name: "drain", args: "[reason]", help: "take the node out of placement (kept across restarts)" },
    Verb { name: "resume", args: "", help: "put a drained node back" },
];

/// How a node is removed, in both READMEs of `nodes/`.
const FORGET_HELP: &str = "Root forgets a decommissioned node with `rmdir nodes/<node>`, once its agent is\n\
                           stopped and no job, image or VM is on it.\n";

/// Longest drain reason kept.
const MAX_REASON: usize = 256;

/// The files of `nodes/<node>/` that follow from the node's state alone: a following head
/// serves them from what the leading head sends it.
pub const LIVE_FILES: [&str; 4] = ["sitrep", "sitrep.json", "metrics", "state"];

/// The files of `nodes/` that follow from every node's state: the folded sets and `best`.
pub const SET_FILES: [&str; 5] = ["all", "up", "down", "drained", "best"];

/// `file` of `nodes/` (its attributes follow from its name alone).
pub fn dir_file_node(file: &str) -> Option<Node> {
    spec_node(DIR_FILES, file)
}

/// What `file` of `nodes/` holds, a file of [`SET_FILES`], from every node's view.
pub fn set_render(views: Vec<NodeView>, file: &str) -> Option<Vec<u8>> {
    let text = match SETS.iter().find(|(n, _)| *n == file) {
        Some((_, which)) => {
            let mut set = NodeSet::new();
            for v in views.iter().filter(|v| which.holds(&v.state)) {
                // Names were checked when the agent connected; they always fit a nodeset.
                let _ = set.insert(&v.name);
            }
            set.fold()
        }
        None if file == "best" => {
            // In nodeset order, as on the leading head: ties go to the first.
            let mut by_name: std::collections::HashMap<String, NodeView> =
                views.into_iter().map(|v| (v.name.clone(), v)).collect();
            let mut order = NodeSet::new();
            for name in by_name.keys() {
                let _ = order.insert(name);
            }
            best_of(order.iter().filter_map(|n| by_name.remove(&n))).unwrap_or_default()
        }
        None => return None,
    };
    Some(format!("{text}\n").into_bytes())
}

/// `file` of node `v`'s directory, dated by the node where it follows from its state.
pub fn file_node(v: &NodeView, file: &str) -> Option<Node> {
    let node = spec_node(NODE_FILES, file)?;
    Some(match file {
        "sitrep" | "sitrep.json" | "metrics" => node.mtime(v.seen_at),
        "state" => node.mtime(v.changed),
        _ => node,
    })
}

/// What `file` of node `v`'s directory holds, a file of [`LIVE_FILES`].
pub fn live_render(v: &NodeView, file: &str) -> Option<Vec<u8>> {
    let sitrep = Sitrep { name: &v.name, state: v.state.word(), age_s: v.age_s, report: &v.report };
    match file {
        "sitrep" => Some(sitrep.text().into_bytes()),
        "sitrep.json" => Some(sitrep.json().into_bytes()),
        "metrics" => Some(sitrep.metrics().into_bytes()),
        "state" => Some(format!("{}\n", v.state.line()).into_bytes()),
        _ => None,
    }
}

pub fn node(cluster: &Cluster, path: &[&str]) -> Result<Node> {
    match path {
        [] => Ok(Node::dir()),
        [name] if cluster.exists(name) => Ok(Node::dir()),
        [name] => spec_node(DIR_FILES, name).ok_or_else(|| FsError::not_found(format!("node {name}"))),
        [name, file] => {
            let v = cluster.view(name).ok_or_else(|| FsError::not_found(format!("node {name}")))?;
            file_node(&v, file).ok_or_else(|| FsError::not_found(format!("nodes/{name}/{file}")))
        }
        _ => Err(FsError::not_found(format!("nodes/{}", path.join("/")))),
    }
}

pub fn list(cluster: &Cluster, path: &[&str]) -> Result<Vec<String>> {
    match path {
        [] => Ok(dir_listing(cluster.names())),
        [name] if cluster.exists(name) => Ok(node_listing()),
        _ => Err(FsError::not_found(format!("nodes/{}", path.join("/")))),
    }
}

/// What `nodes/` lists: its files, then every node's name (in nodeset order).
pub fn dir_listing(names: Vec<String>) -> Vec<String> {
    DIR_FILES.iter().map(|f| f.name.to_string()).chain(names).collect()
}

/// What a node's directory lists.
pub fn node_listing() -> Vec<String> {
    NODE_FILES.iter().map(|f| f.name.to_string()).collect()
}

pub fn render(cluster: &Arc<Cluster>, path: &[&str], _caller: &Caller) -> Answer<Vec<u8>> {
    let line = |s: String| Answer::Now(Ok(format!("{s}\n").into_bytes()));
    match path {
        ["best"] => line(cluster.best().unwrap_or_default()),
        ["README"] => Answer::Now(fixed_render(path).ok_or_else(|| FsError::not_found("nodes/README"))),
        [set] => match SETS.iter().find(|(n, _)| n == set) {
            Some((_, which)) => line(cluster.set(*which).fold()),
            None => Answer::Now(Err(FsError::not_found(format!("nodes/{set}")))),
        },
        [name, "ping"] => ping(cluster.clone(), name.to_string()),
        [name, file] => {
            let Some(v) = cluster.view(name) else {
                return Answer::Now(Err(FsError::not_found(format!("node {name}"))));
            };
            let data = live_render(&v, file).or_else(|| fixed_render(path));
            Answer::Now(data.ok_or_else(|| FsError::not_found(format!("nodes/{name}/{file}"))))
        }
        _ => Answer::Now(Err(FsError::not_found(format!("nodes/{}", path.join("/"))))),
    }
}

/// The files of a node's directory whose content is the same on every head at every moment.
pub const FIXED_FILES: [&str; 2] = ["README", "ctl"];

/// What a file below `nodes/` holds that is the same on every head at every moment: the
/// READMEs, and a node's `ctl` read back (its verbs).
pub fn fixed_render(path: &[&str]) -> Option<Vec<u8>> {
    match path {
        ["README"] => Some(readme(
            "nodes/: every node the cluster knows",
            DIR_FILES,
            &[],
            &format!(
                "  dir  <node>       one node: its sitrep, state, ctl (see its README)\n\n\
                 A node appears when its agent first connects and stays known.\n{FORGET_HELP}"
            ),
        )),
        [name, "README"] => Some(readme(
            &format!("nodes/{name}: one node of the cluster"),
            NODE_FILES,
            &[("ctl", VERBS)],
            &format!(
                "The sitrep keys, their units and the perf_score and load_index formulas are in README.md.\n\
                 {FORGET_HELP}"
            ),
        )),
        [_, "ctl"] => Some(
            VERBS
                .iter()
                .map(|v| format!("{} {}", v.name, v.args).trim_end().to_string() + "\n")
                .collect::<String>()
                .into_bytes(),
        ),
        _ => None,
    }
}

/// Measures a round trip to the agent now, from a task.
fn ping(cluster: Arc<Cluster>, name: String) -> Answer<Vec<u8>> {
    Answer::later(async move {
        let timeout = Duration::from_millis(cluster.cfg.ping_timeout_ms);
        let start = Instant::now();
        cluster.request(&name, Op::Ping, timeout).await?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        Ok(format!("{ms:.2} ms\n").into_bytes())
    })
}

pub fn write(cluster: &Arc<Cluster>, path: &[&str], caller: &Caller, data: &[u8]) -> Answer<Vec<u8>> {
    let [name, "ctl"] = path else {
        return Answer::Now(Err(FsError::denied("this file is read-only")));
    };
    if !caller.is_root() {
        return Answer::Now(Err(FsError::denied("only root may drain or resume a node")));
    }
    if !cluster.exists(name) {
        return Answer::Now(Err(FsError::not_found(format!("node {name}"))));
    }
    let text = match command_text(data, 4096) {
        Ok(t) => t,
        Err(e) => return Answer::Now(Err(with_usage(e))),
    };
    let (verb, args) = text.split_once(char::is_whitespace).map_or((text, ""), |(v, a)| (v, a.trim()));
    let name = name.to_string();
    let cluster = cluster.clone();
    match verb {
        "drain" => {
            if args.len() > MAX_REASON || args.chars().any(char::is_control) {
                return Answer::Now(Err(FsError::invalid(format!(
                    "a drain reason is at most {MAX_REASON} printable characters"
                ))));
            }
            let reason = args.to_string();
            blocking(move || cluster.drain(&name, &reason).map(|()| Vec::new()))
        }
        "resume" if args.is_empty() => blocking(move || cluster.resume(&name).map(|()| Vec::new())),
        "resume" => Answer::Now(Err(FsError::invalid("resume takes no argument"))),
        other => Answer::Now(Err(with_usage(FsError::invalid(format!("unknown verb {other:?}"))))),
    }
}

fn with_usage(e: FsError) -> FsError {
    super::with_usage(e, "nodes/<node>/ctl", VERBS)
}

/// `rmdir nodes/<name>`: root forgets a decommissioned node, once nothing is on it (`holds`
/// names what is) and its agent is gone.
pub fn forget(cluster: &Arc<Cluster>, name: &str, caller: &Caller, holds: impl FnOnce() -> Vec<String>) -> Answer<()> {
    if !caller.is_root() {
        return Answer::Now(Err(FsError::denied("only root removes nodes")));
    }
    let holds = holds();
    if !holds.is_empty() {
        let what = holds.join("; ");
        return Answer::Now(Err(FsError::new(Errno::Busy, format!("{name} still has {what}: end or move them first"))));
    }
    let (cluster, name) = (cluster.clone(), name.to_string());
    blocking(move || cluster.forget(&name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::cluster::NodeState;
    use crate::sitrep::Report;

    fn view(name: &str, state: NodeState, load1: f64) -> NodeView {
        let report = Report { load1, cpus: 4, ..Report::default() };
        let at = std::time::SystemTime::UNIX_EPOCH;
        NodeView { name: name.into(), state, report, age_s: 0.0, seen_at: at, changed: at }
    }

    #[test]
    fn sets_fold_by_state_and_best_breaks_ties_in_nodeset_order() {
        let views = || {
            vec![
                view("cn10", NodeState::Up, 1.0),
                view("cn3", NodeState::Down("agent disconnected".into()), 0.0),
                view("cn1", NodeState::Drained("disk".into()), 0.0),
                view("cn2", NodeState::Up, 1.0),
            ]
        };
        let text = |file: &str| String::from_utf8(set_render(views(), file).unwrap()).unwrap();
        assert_eq!(text("all"), "cn[1-3,10]\n");
        assert_eq!(text("up"), "cn[2,10]\n");
        assert_eq!(text("down"), "cn3\n");
        assert_eq!(text("drained"), "cn1\n");
        // cn2 and cn10 carry the same load: the first in nodeset order wins, as on the leader.
        assert_eq!(text("best"), "cn2\n");
        assert_eq!(set_render(vec![view("cn1", NodeState::Down("x".into()), 0.0)], "best").unwrap(), b"\n");
        assert!(set_render(views(), "README").is_none());
    }
}
