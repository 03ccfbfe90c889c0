//! Multi-node jobs: one run per node at once, the myclush summary, clush -b gathered output, retry-failed attempts.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use clusterfs_fs::{Errno, FsError};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::schedule::{Deps, Free};
use super::{Job, Jobs, State, TaskOf, now_ms};
use crate::head::cluster::NodeState;
use crate::head::store::Store;
use crate::jobs::spec::Nodes;
use crate::jobs::{STDOUT, Spec};
use crate::nodeset::NodeSet;

/// The exit status counted for a node that never ran the command (down, drained, lost), as
/// ssh-based tools count an unreachable node.
pub const UNREACHABLE: i32 = 255;

/// Where a multi-node job runs, and its attempts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spread {
    /// Every node of the job, in nodeset order (for `nodes=<count>`: chosen when it starts).
    pub hosts: Vec<String>,
    /// `hosts` folded.
    pub folded: String,
    /// Each attempt as it started, the first one first.
    pub attempts: Vec<Attempt>,
    /// Hosts (indexes into `hosts`) a retry-failed asked for: the next attempt.
    pub retry: Vec<u32>,
}

/// One attempt: its runs have the ids `base..base + hosts.len()`, one per host in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub base: u64,
    pub hosts: Vec<u32>,
}

impl Spread {
    /// The spread over `names`, put in nodeset order.
    pub fn new(names: impl IntoIterator<Item = String>) -> Spread {
        let mut set = NodeSet::new();
        for n in names {
            // Names come from the cluster's nodes: they always fit a nodeset.
            let _ = set.insert(&n);
        }
        Spread { hosts: set.iter().collect(), folded: set.fold(), ..Spread::default() }
    }

    /// The run of each host in attempt `n` (0-based), or with `None` each host's latest run
    /// over all attempts; in host order.
    pub fn runs(&self, attempt: Option<usize>) -> Vec<(u32, u64)> {
        let attempts = match attempt {
            Some(n) => self.attempts.get(n..=n).unwrap_or(&[]),
            None => &self.attempts[..],
        };
        let mut latest: Vec<Option<u64>> = vec![None; self.hosts.len()];
        for a in attempts {
            for (pos, &h) in a.hosts.iter().enumerate() {
                if let Some(slot) = latest.get_mut(h as usize) {
                    *slot = Some(a.base + pos as u64);
                }
            }
        }
        latest.into_iter().enumerate().filter_map(|(h, run)| Some((h as u32, run?))).collect()
    }

    /// The hosts (indexes) of attempt `n` (0-based), or with `None` all of them; in host order.
    fn hosts_of(&self, attempt: Option<usize>) -> Vec<u32> {
        match attempt {
            None => (0..self.hosts.len() as u32).collect(),
            Some(n) => {
                let mut hosts = self.attempts.get(n).map_or_else(Vec::new, |a| a.hosts.clone());
                hosts.sort_unstable();
                hosts
            }
        }
    }

    /// The names of `hosts_of(attempt)`.
    pub fn names(&self, attempt: Option<usize>) -> Vec<String> {
        self.hosts_of(attempt).iter().filter_map(|&h| self.hosts.get(h as usize).cloned()).collect()
    }

    pub fn host(&self, name: &str) -> Option<u32> {
        self.hosts.iter().position(|h| h == name).map(|h| h as u32)
    }
}

/// How one node's run ended, as the summary sorts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Pass,
    Failed,
    Timeout,
    Down,
}

impl Outcome {
    const ALL: [Outcome; 4] = [Outcome::Pass, Outcome::Failed, Outcome::Timeout, Outcome::Down];

    /// None while the run has not ended.
    pub fn of(run: &Job) -> Option<Outcome> {
        match run.state {
            State::Queued | State::Running => None,
            State::Done => Some(Outcome::Pass),
            State::Timeout => Some(Outcome::Timeout),
            State::Lost => Some(Outcome::Down),
            State::Failed | State::Killed => Some(Outcome::Failed),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Failed => "FAILED",
            Outcome::Timeout => "TIMEOUT",
            Outcome::Down => "DOWN",
        }
    }
}

/// The myclush summary: `PASS: <folded>, SUM: <n>` always, then a line for each other outcome
/// some node had. Nodes still running are in no line yet.
pub fn summary<'a>(outcomes: impl IntoIterator<Item = (&'a str, Option<Outcome>)>) -> String {
    let mut sets: [NodeSet; 4] = Default::default();
    for (node, outcome) in outcomes {
        if let Some(o) = outcome {
            let _ = sets[o as usize].insert(node);
        }
    }
    let mut out = String::new();
    for o in Outcome::ALL {
        let set = &sets[o as usize];
        if o == Outcome::Pass || !set.is_empty() {
            out.push_str(&format!("{}: {}, SUM: {}\n", o.label(), set.fold(), set.len()));
        }
    }
    out
}

/// Outputs gathered as `clush -b` gathers them: nodes with the same stdout and exit status under
/// one folded header, the largest groups first (then in node order); a header names a non-zero
/// exit status.
pub fn gather(runs: impl IntoIterator<Item = (String, i32, Vec<u8>)>) -> String {
    let mut groups: Vec<(Vec<u8>, i32, NodeSet, usize)> = Vec::new();
    let mut index: HashMap<(Vec<u8>, i32), usize> = HashMap::new();
    for (n, (node, code, out)) in runs.into_iter().enumerate() {
        let g = *index.entry((out.clone(), code)).or_insert_with(|| {
            groups.push((out, code, NodeSet::new(), n));
            groups.len() - 1
        });
        let _ = groups[g].2.insert(&node);
    }
    groups.sort_by_key(|g| (std::cmp::Reverse(g.2.len()), g.3));
    let mut text = String::new();
    for (out, code, set, _) in groups {
        let exit = if code == 0 { String::new() } else { format!(" exit {code}") };
        text.push_str(&format!("---------------\n{} ({}){exit}\n---------------\n", set.fold(), set.len()));
        text.push_str(&String::from_utf8_lossy(&out));
        if !out.is_empty() && !out.ends_with(b"\n") {
            text.push('\n');
        }
    }
    text
}

impl Jobs {
    /// The spread a spec asks for, checked against the cluster: `None` for a one-node job.
    pub(super) fn spread_of(&self, spec: &Spec) -> Result<Option<Arc<Spread>>, FsError> {
        let spread = match &spec.nodes {
            Nodes::Count(1) => return Ok(None),
            Nodes::Count(n) => {
                let known = self.cluster.names().len();
                if *n as usize > known {
                    return Err(FsError::invalid(format!("nodes={n}: this cluster has {known} nodes")));
                }
                Spread::default()
            }
            Nodes::Set(text) => {
                let set = self.cluster.nodeset(text).map_err(|e| FsError::invalid(format!("nodes={text}: {e}")))?;
                let mut unknown = NodeSet::new();
                for name in set.iter().filter(|n| !self.cluster.exists(n)) {
                    let _ = unknown.insert(&name);
                }
                if !unknown.is_empty() {
                    return Err(FsError::invalid(format!(
                        "nodes={text}: {} {} of this cluster",
                        unknown.fold(),
                        if unknown.len() == 1 { "is not a node" } else { "are not nodes" }
                    )));
                }
                if set.is_empty() {
                    return Err(FsError::invalid(format!("nodes={text}: the nodeset is empty")));
                }
                Spread::new(set.iter())
            }
        };
        if spec.array.is_some() {
            return Err(FsError::invalid(
                "array and a multi-node nodes= cannot be combined: an array task runs on one node",
            ));
        }
        Ok(Some(Arc::new(spread)))
    }

    /// Starts the next attempt of multi-node job `id` on all its nodes at once, once every up
    /// node of it has room; until then the room of its nodes is held for it, so smaller jobs
    /// behind it cannot starve it. Down and drained nodes fail at once, with why.
    pub(super) fn start_spread(self: &Arc<Self>, id: u64, free: &mut Free) {
        let Some((spread, cpus, mem, after, afterany, count, copy)) = self
            .with(id, |j| {
                let count = match j.spec.nodes {
                    Nodes::Count(n) => n,
                    Nodes::Set(_) => 0,
                };
                let s = &j.spec;
                Some((j.spread.clone()?, s.cpus, s.mem, s.after.clone(), s.afterany.clone(), count, s.copy.is_some()))
            })
            .flatten()
        else {
            return;
        };
        let first = spread.attempts.is_empty();
        if first {
            match self.deps(&after, &afterany) {
                Deps::Ready => {}
                Deps::Wait(reason) => return self.set_reason(id, reason),
                Deps::Broken(reason) => return self.fail_queued(id, reason),
            }
        }
        let mut spread = (*spread).clone();
        let picked = first && count > 0;
        if picked {
            match free.pick(count, cpus, mem) {
                Ok(names) => spread = Spread::new(names),
                Err(reason) => return self.set_reason(id, reason),
            }
        }
        let hosts: Vec<u32> =
            if first { (0..spread.hosts.len() as u32).collect() } else { std::mem::take(&mut spread.retry) };
        if hosts.is_empty() {
            return;
        }
        let mut away: HashMap<u32, (State, String)> = HashMap::new();
        let mut up = Vec::new();
        // Nodes not heard from since the head started may just be redialling: wait for them.
        let mut awaited = NodeSet::new();
        for name in hosts.iter().map(|&h| &spread.hosts[h as usize]).filter(|n| self.cluster.awaited(n)) {
            let _ = awaited.insert(name);
        }
        if !awaited.is_empty() {
            let reason = format!("waiting for {} to report after the head started", awaited.fold());
            return self.set_reason(id, reason);
        }
        for &h in &hosts {
            let name = &spread.hosts[h as usize];
            let why = |word: &str, r: String| {
                if r.is_empty() { format!("{name} is {word}") } else { format!("{name} is {word}: {r}") }
            };
            let failed = match self.cluster.view(name).map(|v| v.state) {
                Some(NodeState::Up) => {
                    up.push(name.clone());
                    continue;
                }
                Some(NodeState::Down(r)) => (State::Lost, why("down", r)),
                Some(NodeState::Drained(r)) => (State::Failed, why("drained", r)),
                None => (State::Lost, format!("{name} is no longer a node of this cluster")),
            };
            away.insert(h, failed);
        }
        if !picked {
            let mut short = NodeSet::new();
            for name in up.iter().filter(|n| !free.room(n, cpus, mem)) {
                let _ = short.insert(name);
            }
            if !short.is_empty() {
                for name in &up {
                    free.hold(name);
                }
                return self.set_reason(
                    id,
                    format!("waiting for room on {} ({} of {} nodes)", short.fold(), short.len(), hosts.len()),
                );
            }
            for name in &up {
                free.take(name, cpus, mem);
            }
        }
        let n = hosts.len() as u64;
        let base = self.next_id.fetch_add(n, Ordering::SeqCst);
        let attempt = spread.attempts.len() as u32;
        let Some(runs) = self.with(id, |p| {
            hosts
                .iter()
                .enumerate()
                .map(|(pos, &h)| {
                    let t = TaskOf { parent: id, index: h, pos: pos as u32, attempt: Some(attempt) };
                    let run = Job { node: Some(spread.hosts[h as usize].clone()), ..p.child(base + pos as u64, t) };
                    match away.get(&h) {
                        Some((state, reason)) => {
                            Job { state: *state, reason: reason.clone(), ended_ms: Some(now_ms()), ..run }
                        }
                        None => Job { state: State::Running, started_ms: Some(now_ms()), ..run },
                    }
                })
                .collect::<Vec<Job>>()
        }) else {
            return;
        };
        spread.attempts.push(Attempt { base, hosts });
        let spread = Arc::new(spread);
        // The runs are in the map before the job says it runs, so whoever sees it running sees them.
        for r in &runs {
            self.track(r);
            self.jobs.insert(r.id, r.clone());
        }
        let ticket = match self.commit_start(id, &spread, &runs) {
            Ok(Some(ticket)) => ticket,
            other => {
                if let Err(e) = other {
                    warn!(job = id, error = %e, "cannot start a multi-node job");
                }
                for r in &runs {
                    self.jobs.remove(&r.id);
                    self.active.remove(&r.id);
                }
                return;
            }
        };
        if let Err(e) = self.durable(ticket) {
            warn!(job = id, error = %e, "a multi-node start may not be durable");
        }
        self.changed.notify_waiters();
        info!(job = id, nodes = %spread.folded, attempt = attempt + 1, away = away.len(), "multi-node job started");
        let mut started = Vec::new();
        for r in runs.into_iter().filter(|r| r.state == State::Running) {
            started.push((r.node.clone().unwrap_or_default(), r.id));
            self.dispatch(r);
        }
        if copy {
            self.drive_copy(id, started);
        }
    }

    /// Marks job `id` running with its new attempt, in one store commit with its runs: a head
    /// that stops at any point restarts with both or neither. None if the job is no longer
    /// waiting to start (killed or removed meanwhile).
    fn commit_start(&self, id: u64, spread: &Arc<Spread>, runs: &[Job]) -> Result<Option<u64>, FsError> {
        let mut changes = Vec::with_capacity(runs.len() + 1);
        for r in runs {
            changes.push(Store::change("jobs", &r.id.to_string(), r).map_err(FsError::from)?);
        }
        let Some(mut entry) = self.jobs.get_mut(&id) else { return Ok(None) };
        if entry.state != State::Queued || entry.held {
            return Ok(None);
        }
        let mut p = entry.clone();
        p.state = State::Running;
        p.reason = match spread.attempts.last() {
            // A retry runs on the nodes that did not pass, not on the whole set.
            Some(a) if spread.attempts.len() > 1 => {
                let mut on = NodeSet::new();
                for &h in &a.hosts {
                    let _ = on.insert(&spread.hosts[h as usize]);
                }
                format!("on {} (attempt {})", on.fold(), spread.attempts.len())
            }
            _ => format!("on {}", spread.folded),
        };
        p.started_ms = Some(now_ms());
        p.spread = Some(spread.clone());
        changes.push(Store::change("jobs", &id.to_string(), &p).map_err(FsError::from)?);
        let ticket = self.cluster.store().write_later(changes);
        self.track(&p);
        *entry = p;
        Ok(Some(ticket))
    }

    /// Ends multi-node job `id` once every run of its last attempt has: done if every node
    /// passed (over all attempts), else failed naming the nodes that did not; its exit status
    /// is the largest of its nodes' (`clush -S`).
    pub(super) fn settle_spread(&self, id: u64) {
        // Checked every pass while the job runs: only the latest attempt's run ids are read.
        let last = self.with(id, |j| j.spread.as_ref()?.attempts.last().map(|a| (a.base, a.hosts.len() as u64)));
        let Some((base, hosts)) = last.flatten() else { return };
        if (0..hosts).rev().any(|pos| !self.with(base + pos, |r| r.state.ended()).unwrap_or(false)) {
            return;
        }
        let Some(spread) = self.with(id, |j| j.spread.clone()).flatten() else { return };
        let runs = self.spread_runs(&spread, None);
        let mut bad = NodeSet::new();
        let mut worst = 0;
        for (node, run) in &runs {
            let run = run.as_ref();
            if run.and_then(Outcome::of) != Some(Outcome::Pass) {
                let _ = bad.insert(node);
            }
            worst = worst.max(run.and_then(|r| r.exit.as_ref()).map_or(UNREACHABLE, |e| e.code));
        }
        let n = runs.len();
        // Its own gathered lines, as for any job: a head whose spool has less says so.
        let spooled = self.output_lens(id);
        let _ = self.update(id, |p| {
            if p.state != State::Running {
                return;
            }
            p.spooled = Some(spooled);
            (p.state, p.reason) = match (&p.killed_by, bad.is_empty()) {
                (Some(who), _) => (State::Killed, format!("by {who}")),
                (None, true) => (State::Done, String::new()),
                (None, false) => (State::Failed, format!("on {} ({} of {n} nodes)", bad.fold(), bad.len())),
            };
            p.exit = Some(crate::jobs::Exit { code: worst, signal: None, reason: None });
            p.ended_ms = Some(now_ms());
        });
        info!(job = id, nodes = n, failed = bad.len(), "multi-node job ended");
    }

    /// Each host of `spread` with its run in `attempt` (None: its latest run), in host order;
    /// a host without a run yet (the job is queued) has `None`. `attempt` limits the hosts to
    /// those the attempt ran on.
    pub fn spread_runs(&self, spread: &Spread, attempt: Option<usize>) -> Vec<(String, Option<Job>)> {
        let runs: HashMap<u32, u64> = spread.runs(attempt).into_iter().collect();
        spread
            .hosts_of(attempt)
            .into_iter()
            .map(|h| (spread.hosts[h as usize].clone(), runs.get(&h).and_then(|&r| self.get(r))))
            .collect()
    }

    /// Node `name`'s run of multi-node job `job` in `attempt` (None: its latest); before the
    /// node has one (the job is queued), what the job says of it.
    pub fn node_run(&self, job: &Job, attempt: Option<usize>, name: &str) -> Option<Job> {
        let spread = job.spread.as_ref()?;
        let h = spread.host(name)?;
        if let Some(&(_, run)) = spread.runs(attempt).iter().find(|r| r.0 == h) {
            return self.get(run);
        }
        attempt.is_none().then(|| {
            let t = TaskOf { parent: job.id, index: h, pos: 0, attempt: None };
            let reason =
                if job.state.ended() { format!("never started: job {} ended", job.id) } else { job.reason.clone() };
            Job { state: job.state, reason, node: Some(name.to_string()), ..job.child(0, t) }
        })
    }

    /// Where a job's runs stand, node by node: a multi-node job's nodes, or a plain job's one.
    fn outcomes(&self, job: &Job, attempt: Option<usize>) -> Vec<(String, Option<Job>)> {
        match &job.spread {
            Some(spread) => self.spread_runs(spread, attempt),
            None => job.node.iter().map(|n| (n.clone(), Some(job.clone()))).collect(),
        }
    }

    /// `summary` of a job (or of one attempt of it).
    pub fn summary(&self, job: &Job, attempt: Option<usize>) -> String {
        let runs = self.outcomes(job, attempt);
        summary(runs.iter().map(|(n, r)| (n.as_str(), r.as_ref().and_then(Outcome::of))))
    }

    /// `output` of a job (or of one attempt of it): the ended nodes' stdout, gathered.
    pub fn gathered(&self, job: &Job, attempt: Option<usize>) -> std::io::Result<String> {
        let mut runs = Vec::new();
        for (node, run) in self.outcomes(job, attempt) {
            let Some((id, code)) = run.and_then(|r| Some((r.id, r.exit.as_ref()?.code))) else { continue };
            runs.push((node, code, self.read_output(id, STDOUT, 0, usize::MAX)?));
        }
        Ok(gather(runs))
    }

    /// `retry-failed`: an ended multi-node job runs again on the nodes that did not pass, as a
    /// new attempt; the earlier attempts stay readable. Returns how many nodes.
    pub fn retry_failed(&self, id: u64) -> Result<usize, FsError> {
        let (spread, state, line) = self
            .with(id, |j| (j.spread.clone(), j.state, j.state_line()))
            .ok_or_else(|| FsError::not_found(format!("job {id}")))?;
        let spread = spread.ok_or_else(|| {
            FsError::invalid(format!("job {id} runs on one node: retry-failed applies to multi-node jobs (nodes=...)"))
        })?;
        if !state.ended() {
            return Err(FsError::new(
                Errno::Busy,
                format!("job {id} is {line}: retry-failed applies once it has ended"),
            ));
        }
        // Over all attempts, `spread_runs` has one entry per host, in host order.
        let failed: Vec<u32> = (0u32..)
            .zip(self.spread_runs(&spread, None))
            .filter(|(_, (_, r))| r.as_ref().and_then(Outcome::of) != Some(Outcome::Pass))
            .map(|(h, _)| h)
            .collect();
        if failed.is_empty() {
            return Err(FsError::invalid(format!("job {id}: every node passed, there is nothing to retry")));
        }
        let n = failed.len();
        let mut retried = false;
        self.update(id, |p| {
            let Some(s) = p.spread.as_ref().filter(|_| p.state.ended()) else { return };
            p.spread = Some(Arc::new(Spread { retry: failed, ..(**s).clone() }));
            p.state = State::Queued;
            p.reason = format!("retrying {n} nodes");
            p.exit = None;
            p.ended_ms = None;
            p.killed_by = None;
            retried = true;
        })?;
        if !retried {
            return Err(FsError::new(
                Errno::Busy,
                format!("job {id} changed meanwhile; look at its state and try again"),
            ));
        }
        info!(job = id, nodes = n, "retrying the failed nodes");
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_byte_exact() {
        let o = [
            ("cn1", Some(Outcome::Pass)),
            ("cn0", Some(Outcome::Pass)),
            ("cn3", Some(Outcome::Failed)),
            ("cn2", None),
            ("cn4", Some(Outcome::Down)),
        ];
        assert_eq!(summary(o), "PASS: cn[0-1], SUM: 2\nFAILED: cn3, SUM: 1\nDOWN: cn4, SUM: 1\n");
        assert_eq!(summary([("cn1", None)]), "PASS: , SUM: 0\n");
        assert_eq!(summary([("a", Some(Outcome::Timeout))]), "PASS: , SUM: 0\nTIMEOUT: a, SUM: 1\n");
    }

    #[test]
    fn outputs_gather_largest_first() {
        let runs = vec![
            ("cn1".to_string(), 0, b"x\n".to_vec()),
            ("cn2".to_string(), 0, b"y".to_vec()),
            ("cn3".to_string(), 0, b"y".to_vec()),
            ("cn4".to_string(), 1, b"y".to_vec()),
        ];
        assert_eq!(
            gather(runs),
            "---------------\ncn[2-3] (2)\n---------------\ny\n\
             ---------------\ncn1 (1)\n---------------\nx\n\
             ---------------\ncn4 (1) exit 1\n---------------\ny\n"
        );
        assert_eq!(gather(Vec::new()), "");
    }

    #[test]
    fn runs_follow_attempts() {
        let mut s = Spread::new(["cn2", "cn10", "cn1"].map(String::from));
        assert_eq!(s.hosts, ["cn1", "cn2", "cn10"]);
        assert_eq!(s.folded, "cn[1-2,10]");
        assert!(s.runs(None).is_empty());
        s.attempts.push(Attempt { base: 100, hosts: vec![0, 1, 2] });
        s.attempts.push(Attempt { base: 200, hosts: vec![2] });
        assert_eq!(s.runs(None), [(0, 100), (1, 101), (2, 200)]);
        assert_eq!(s.runs(Some(0)), [(0, 100), (1, 101), (2, 102)]);
        assert_eq!(s.runs(Some(1)), [(2, 200)]);
        assert!(s.runs(Some(2)).is_empty());
    }
}
