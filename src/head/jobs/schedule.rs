//! The scheduler: dependencies, placement, dispatch to agents, lost nodes and retention.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::array::Tally;
use super::{Job, Jobs, Shape, State, now_ms};
use crate::head::cluster::NodeState;
use crate::jobs::Run;
use crate::proto::{Op, Reply};

/// Where the start request of an unconfirmed run stands.
#[derive(Debug, Clone, Copy)]
pub(super) enum Dispatch {
    /// Asked; no answer yet.
    InFlight,
    /// Asked at this instant and not confirmed (timeout, node gone): asked again later.
    Failed(Instant),
}

/// The shortest time between two scheduler passes.
const PASS_GAP: Duration = Duration::from_millis(3);

/// How long after an unconfirmed start request the scheduler asks again.
const REDISPATCH_AFTER: Duration = Duration::from_secs(2);

/// Room left on the up nodes during one scheduler pass.
pub(super) struct Free {
    /// (name, free cpus, free memory, load index) of each up, undrained node.
    nodes: Vec<(String, u64, u64, f64)>,
    /// Sizes found not to fit in this pass (room only shrinks within a pass), with why.
    no_fit: HashMap<(u32, Option<u64>), String>,
    /// How many of `nodes` have a free cpu.
    with_cpus: usize,
    /// The most cpus and the most memory any known node has (up or not), free or not.
    most: (u64, u64),
}

/// How a job that waits for free cpus is told so: this, the count, " free cpus".
const WAIT_CPUS: &str = "waiting for a node with ";
/// How a job is told that no node is up (and undrained) to take it.
const WAIT_UP: &str = "waiting for a node to be up";

/// Why no job of the waiting room can start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Blocked {
    /// Nodes are up and none has a free cpu.
    Full,
    /// No node is up and undrained.
    NoNode,
}

/// The waiting-room place of a job that waits for free cpus, or for any node to be up, and
/// nothing else: told so, queued, released, one run, no dependency.
fn room_key(j: &Job) -> Option<(i32, u64)> {
    let room_only = j.state == State::Queued
        && !j.held
        && j.task.is_none()
        && j.shape() == Shape::One
        && j.spec.after.is_empty()
        && j.spec.afterany.is_empty()
        && (waits_for_cpus(&j.reason, j.spec.cpus) || j.reason == WAIT_UP);
    room_only.then_some((-j.spec.priority, j.id))
}

/// Whether `reason` says the job waits for `cpus` free cpus, which is what a pass that finds
/// every node full would say again.
fn waits_for_cpus(reason: &str, cpus: u32) -> bool {
    reason.strip_prefix(WAIT_CPUS).and_then(|r| r.strip_suffix(" free cpus")).and_then(|n| n.parse().ok()) == Some(cpus)
}

impl Free {
    fn new(nodes: Vec<(String, u64, u64, f64)>, most: (u64, u64)) -> Free {
        let with_cpus = nodes.iter().filter(|n| n.1 > 0).count();
        Free { nodes, no_fit: HashMap::new(), with_cpus, most }
    }

    /// Sets a node's free cpus and memory, keeping the count of nodes with a free cpu.
    fn set(with_cpus: &mut usize, node: &mut (String, u64, u64, f64), cpus: u64, mem: u64) {
        match (node.1 > 0, cpus > 0) {
            (true, false) => *with_cpus -= 1,
            (false, true) => *with_cpus += 1,
            _ => {}
        }
        node.1 = cpus;
        node.2 = mem;
    }

    /// The up node with the lowest load index that fits, with the room taken; else why none.
    pub(super) fn place(&mut self, cpus: u32, mem: Option<u64>) -> Result<String, String> {
        if let Some(why) = self.no_fit.get(&(cpus, mem)) {
            return Err(why.clone());
        }
        let placed = self.fit(u64::from(cpus), mem.unwrap_or(0));
        if let Err(why) = &placed {
            self.no_fit.insert((cpus, mem), why.clone());
        }
        placed
    }

    fn fit(&mut self, cpus: u64, mem: u64) -> Result<String, String> {
        let with_cpus = &mut self.with_cpus;
        let best =
            self.nodes.iter_mut().filter(|n| n.1 >= cpus && n.2 >= mem).min_by(|a, b| a.3.total_cmp(&b.3)).map(|n| {
                let (c, m) = (n.1 - cpus, n.2 - mem);
                Free::set(with_cpus, n, c, m);
                n.0.clone()
            });
        best.ok_or_else(|| {
            // A size no node has waits for a node that has it, and says so: not for room.
            if cpus > self.most.0 && self.most.0 > 0 {
                format!("no node has {cpus} cpus (the most is {}): waiting for one that has", self.most.0)
            } else if mem > self.most.1 && self.most.1 > 0 {
                format!("no node has {mem} bytes of memory (the most is {}): waiting for one that has", self.most.1)
            } else if self.nodes.is_empty() {
                WAIT_UP.to_string()
            } else if self.nodes.iter().all(|n| n.1 < cpus) {
                format!("{WAIT_CPUS}{cpus} free cpus")
            } else {
                format!("waiting for a node with {mem} bytes of free memory")
            }
        })
    }

    /// Why no job can start now, if none can (every job takes at least one cpu).
    pub(super) fn blocked(&self) -> Option<Blocked> {
        match (self.nodes.is_empty(), self.with_cpus) {
            (true, _) => Some(Blocked::NoNode),
            (false, 0) => Some(Blocked::Full),
            _ => None,
        }
    }

    /// Whether `node` is up with this much room.
    pub(super) fn room(&self, node: &str, cpus: u32, mem: Option<u64>) -> bool {
        self.nodes.iter().any(|n| n.0 == node && n.1 >= u64::from(cpus) && n.2 >= mem.unwrap_or(0))
    }

    /// Takes room on `node` (which has it).
    pub(super) fn take(&mut self, node: &str, cpus: u32, mem: Option<u64>) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.0 == node) {
            let (c, m) = (n.1.saturating_sub(u64::from(cpus)), n.2.saturating_sub(mem.unwrap_or(0)));
            Free::set(&mut self.with_cpus, n, c, m);
        }
    }

    /// Keeps what room `node` has for a job that waits for it: nothing else starts there in this pass.
    pub(super) fn hold(&mut self, node: &str) {
        self.no_fit.clear();
        self.nodes.retain(|n| n.0 != node);
        self.with_cpus = self.nodes.iter().filter(|n| n.1 > 0).count();
    }

    /// `count` distinct nodes with room, the least loaded first, with the room taken; else why not.
    pub(super) fn pick(&mut self, count: u32, cpus: u32, mem: Option<u64>) -> Result<Vec<String>, String> {
        let (c, m) = (u64::from(cpus), mem.unwrap_or(0));
        let with_cpus = &mut self.with_cpus;
        let mut fit: Vec<&mut (String, u64, u64, f64)> =
            self.nodes.iter_mut().filter(|n| n.1 >= c && n.2 >= m).collect();
        if fit.len() < count as usize {
            return Err(format!("waiting for {count} nodes with {cpus} free cpus ({} have them now)", fit.len()));
        }
        fit.sort_by(|a, b| a.3.total_cmp(&b.3));
        Ok(fit
            .into_iter()
            .take(count as usize)
            .map(|n| {
                let (nc, nm) = (n.1 - c, n.2 - m);
                Free::set(with_cpus, n, nc, nm);
                n.0.clone()
            })
            .collect())
    }

    /// Returns room taken for a run that did not start.
    pub(super) fn give_back(&mut self, node: &str, cpus: u32, mem: Option<u64>) {
        self.no_fit.clear();
        if let Some(n) = self.nodes.iter_mut().find(|n| n.0 == node) {
            let (c, m) = (n.1 + u64::from(cpus), n.2 + mem.unwrap_or(0));
            Free::set(&mut self.with_cpus, n, c, m);
        }
    }
}

/// Whether a job's dependencies let it start.
pub(super) enum Deps {
    Ready,
    Wait(String),
    Broken(String),
}

/// How often a pass reads every job rather than those not ended.
const FULL_PASS: Duration = Duration::from_secs(1);

/// What one pass found to do, job by job.
#[derive(Default)]
struct Pass {
    expired_before: u64,
    /// Array jobs' running tasks.
    tally: HashMap<u64, Tally>,
    /// (-priority, id, shape) of each job that may start something, but those of `room`.
    starts: Vec<(i32, u64, Shape)>,
    /// Jobs found waiting for room only: they go to the waiting room.
    to_room: Vec<(i32, u64)>,
    running: Vec<u64>,
    spreads: Vec<u64>,
    /// Ended jobs past retention (full passes only).
    ended: Vec<u64>,
    /// Cpus and memory running jobs hold, by node.
    reserved: HashMap<String, (u64, u64)>,
}

impl Pass {
    fn visit(&mut self, j: &Job) {
        if let Some(t) = j.task
            && j.state == State::Running
        {
            self.tally.entry(t.parent).or_default().running += 1;
        }
        if j.state == State::Running
            && let Some(n) = &j.node
        {
            let r = self.reserved.entry(n.clone()).or_default();
            r.0 += u64::from(j.spec.cpus);
            r.1 += j.spec.mem.unwrap_or(0);
        }
        let shape = j.shape();
        match (j.state, shape) {
            (State::Queued, _) if j.held => {}
            (State::Queued, _) if let Some(key) = room_key(j) => self.to_room.push(key),
            (State::Queued, _) | (State::Running, Shape::Array) => self.starts.push((-j.spec.priority, j.id, shape)),
            (State::Running, Shape::Spread) => self.spreads.push(j.id),
            (State::Running, Shape::One) => self.running.push(j.id),
            _ if j.task.is_none() && j.ended_ms.unwrap_or(j.submitted_ms) < self.expired_before => {
                self.ended.push(j.id)
            }
            _ => {}
        }
    }
}

impl Jobs {
    /// One pass of the scheduler: lost nodes and resends, then placement by priority and
    /// submission order, then retention. A pass reads the jobs not ended (through `active`
    /// when they are few) and the front of the waiting room; once a second it reads every
    /// job, for retention, checks `active` against them and rebuilds the room.
    pub fn schedule(self: &Arc<Self>) {
        let retention = self.cfg.retention_s.saturating_mul(1000);
        let mut pass = Pass { expired_before: now_ms().saturating_sub(retention), ..Pass::default() };
        let full = {
            let mut at = self.full_pass_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = at.is_none_or(|t| t.elapsed() >= FULL_PASS);
            if due {
                *at = Some(Instant::now());
            }
            due
        };
        // Through the index when most jobs are ended ones kept for retention; else a walk
        // of every job costs less than a lookup of each one not ended.
        if full || self.active.len() * 2 > self.jobs.len() {
            for j in self.jobs.iter() {
                match (j.state.ended(), full) {
                    (true, false) => continue,
                    (true, true) => {
                        self.active.remove(&j.id);
                    }
                    // Jobs that wait for room only belong in the room, not in `active`.
                    (false, true) if room_key(&j).is_none() && self.active.insert(j.id) => {
                        warn!(job = j.id, state = ?j.state, "a job not ended was missing from the scheduler's index");
                    }
                    (false, _) => {}
                }
                pass.visit(&j);
            }
        } else {
            let ids: Vec<u64> = self.active.iter().map(|id| *id).collect();
            for id in ids {
                match self.jobs.get(&id) {
                    Some(j) if !j.state.ended() => pass.visit(&j),
                    _ => {
                        self.active.remove(&id);
                    }
                }
            }
        }
        let Pass { mut tally, mut starts, to_room, running, spreads, ended, reserved, .. } = pass;
        if full || !to_room.is_empty() {
            let mut room = self.room.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // A pass that read every job found every job the room should have: what else is
            // there (killed, removed, given another priority while waiting) goes.
            if full {
                room.clear();
            }
            for key in to_room {
                self.active.remove(&key.1);
                room.insert(key);
            }
        }
        for id in running {
            self.check_lost(id);
            self.redispatch(id);
        }
        for id in spreads {
            self.settle_spread(id);
        }
        let waiting = !self.room.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_empty();
        if starts.is_empty() && !waiting {
            return self.expire_all(ended);
        }
        let mut free = self.free_nodes(&reserved);
        // A room that no job can leave is walked once, when that becomes so or why changes,
        // so that its jobs say why they wait; then left alone (with thousands queued on a
        // full cluster, or one whose nodes are all down or drained, a pass touches none).
        let blocked = free.blocked();
        let told = {
            let mut last = self.room_blocked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::replace(&mut *last, blocked) == blocked
        };
        starts.sort_unstable();
        // Both in start order: the waiting room's front while a job can leave it, the
        // others all.
        let mut starts = starts.into_iter().peekable();
        let mut after = None;
        loop {
            let stay = free.blocked().is_some() && (told || free.blocked() != blocked);
            let waiter = if stay { None } else { self.room_after(after) };
            match (waiter, starts.peek()) {
                (None, None) => break,
                (Some(key), next) if next.is_none_or(|n| key < (n.0, n.1)) => {
                    after = Some(key);
                    self.start_waiter(key, &mut free);
                }
                _ => {
                    let Some((_, id, shape)) = starts.next() else { break };
                    match shape {
                        Shape::One => self.try_start(id, &mut free),
                        Shape::Array => self.advance_array(id, tally.remove(&id).unwrap_or_default(), &mut free),
                        Shape::Spread => self.start_spread(id, &mut free),
                    }
                }
            }
        }
        self.expire_all(ended);
    }

    /// The waiting room's next place after `after` (from the front when None).
    fn room_after(&self, after: Option<(i32, u64)>) -> Option<(i32, u64)> {
        let room = self.room.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match after {
            None => room.first().copied(),
            Some(a) => room.range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)).next().copied(),
        }
    }

    /// Tries to start the job at `key` of the waiting room. One that no longer waits for room
    /// only (started, killed, given another priority or another reason) leaves the room, and
    /// goes back to `active` unless it ended.
    fn start_waiter(self: &Arc<Self>, key: (i32, u64), free: &mut Free) {
        let id = key.1;
        if self.with(id, room_key).flatten() == Some(key) {
            self.try_start(id, free);
            if self.with(id, room_key).flatten() == Some(key) {
                return;
            }
        }
        self.room.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&key);
        if self.with(id, |j| !j.state.ended()).unwrap_or(false) {
            self.active.insert(id);
        }
    }

    fn expire_all(&self, ended: Vec<u64>) {
        for id in ended {
            self.expire(id);
        }
    }

    /// The room on each up node once the running jobs' reservations (cpus, memory by node)
    /// are taken.
    fn free_nodes(&self, reserved: &HashMap<String, (u64, u64)>) -> Free {
        let mut nodes = Vec::new();
        let mut most = (0, 0);
        for name in self.cluster.names() {
            let Some(v) = self.cluster.view(&name) else { continue };
            most = (most.0.max(v.report.cpus), most.1.max(v.report.mem_total));
            if v.state == NodeState::Up {
                let (cpus, mem) = reserved.get(&name).copied().unwrap_or_default();
                let load = v.report.load_index();
                nodes.push((name, v.report.cpus.saturating_sub(cpus), v.report.mem_total.saturating_sub(mem), load));
            }
        }
        Free::new(nodes, most)
    }

    /// Whether the jobs `after` (exit 0 needed) and `afterany` have ended.
    pub(super) fn deps(&self, after: &[u64], afterany: &[u64]) -> Deps {
        for (deps, need_ok) in [(after, true), (afterany, false)] {
            for &dep in deps {
                match self.with(dep, |d| (d.state, d.state_line())) {
                    Some((s, _)) if !s.ended() => return Deps::Wait(format!("waiting for job {dep}")),
                    Some((s, line)) if need_ok && s != State::Done => {
                        return Deps::Broken(format!("dependency {dep} ended {line}"));
                    }
                    _ => {}
                }
            }
        }
        Deps::Ready
    }

    /// Ends a queued job whose dependency failed.
    pub(super) fn fail_queued(&self, id: u64, reason: String) {
        let _ = self.update(id, |j| {
            j.state = State::Failed;
            j.reason = reason;
            j.ended_ms = Some(now_ms());
        });
    }

    fn try_start(self: &Arc<Self>, id: u64, free: &mut Free) {
        // Dependencies are looked up after the job is let go: no job is read inside another's read.
        let Some((cpus, mem, after, afterany)) =
            self.with(id, |j| (j.spec.cpus, j.spec.mem, j.spec.after.clone(), j.spec.afterany.clone()))
        else {
            return;
        };
        match self.deps(&after, &afterany) {
            Deps::Ready => {}
            Deps::Wait(reason) => return self.set_reason(id, reason),
            Deps::Broken(reason) => return self.fail_queued(id, reason),
        }
        let node = match free.place(cpus, mem) {
            Ok(node) => node,
            Err(reason) => return self.set_reason(id, reason),
        };
        // The run now belongs to this node: from here it is only ever resent there.
        let Ok(job) = self.update(id, |j| {
            j.state = State::Running;
            j.node = Some(node.clone());
            j.reason.clear();
            j.started_ms = Some(now_ms());
        }) else {
            return;
        };
        info!(job = id, node, "job placed");
        self.dispatch(job);
    }

    pub(super) fn set_reason(&self, id: u64, reason: String) {
        // Kept in memory only: the job's next store write takes it along, and a head that
        // restarts says why again from its first pass. (Nothing waits on a reason, so no one
        // is woken: the scheduler would only make another pass.)
        if let Some(mut job) = self.jobs.get_mut(&id)
            && job.reason != reason
        {
            job.reason = reason;
        }
    }

    /// The run request for a placed job (an array task runs its array job's script).
    fn run_of(&self, job: &Job) -> Run {
        let node = job.node.clone().unwrap_or_default();
        let mut env = job.spec.env.clone();
        let (job_id, index, script, nodes, copy) = match job.task {
            Some(t) => self
                .with(t.parent, |p| {
                    let index = if p.spec.array.is_some() { t.index.to_string() } else { String::new() };
                    let nodes = p.spread.as_ref().map_or_else(|| node.clone(), |s| s.folded.clone());
                    let copy = p.spec.copy.as_ref().map(|c| c.dest.replace("%n", &node));
                    (t.parent, index, p.spec.script.clone(), nodes, copy)
                })
                .unwrap_or_else(|| (t.parent, String::new(), "".into(), node.clone(), None)),
            None => (job.id, String::new(), job.spec.script.clone(), node.clone(), None),
        };
        env.insert("CLUSTER_JOB_ID".into(), job_id.to_string());
        env.insert("CLUSTER_NODE".into(), node);
        env.insert("CLUSTER_NODES".into(), nodes);
        env.insert("CLUSTER_ARRAY_INDEX".into(), index);
        Run {
            run: job.id,
            script: script.to_string(),
            uid: job.owner.uid,
            gid: job.owner.gid,
            groups: job.owner.groups.clone(),
            user: job.owner.user.clone(),
            env,
            cwd: job.spec.cwd.clone(),
            timeout_s: job.spec.timeout_s,
            isolate: job.spec.isolate,
            rootfs: job.spec.rootfs.clone(),
            cpus: job.spec.cpus,
            mem: job.spec.mem,
            copy,
        }
    }

    /// Asks again for a running job whose start was never confirmed, once its node is
    /// connected and the last request has failed a while ago: a request can be lost with a
    /// connection or refused while the node comes up, and nothing else would resend it.
    fn redispatch(self: &Arc<Self>, id: u64) {
        let Some((confirmed, node)) = self.with(id, |j| (j.confirmed, j.node.clone())) else { return };
        let Some(node) = node.filter(|_| !confirmed) else { return };
        let due = match self.dispatching.get(&id).map(|d| *d) {
            Some(Dispatch::InFlight) => false,
            Some(Dispatch::Failed(at)) => at.elapsed() >= REDISPATCH_AFTER,
            None => true,
        };
        let connected = self.cluster.state(&node).is_some_and(|(s, _)| !matches!(s, NodeState::Down(_)));
        if due
            && connected
            && let Some(job) = self.get(id)
        {
            debug!(job = id, node, "start not confirmed: asking again");
            self.dispatch(job);
        }
    }

    /// Asks the job's node to start it, from a task; a resend is harmless (the agent dedups).
    pub(super) fn dispatch(self: &Arc<Self>, job: Job) {
        if let Some(Dispatch::InFlight) = self.dispatching.insert(job.id, Dispatch::InFlight) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let node = job.node.clone().unwrap_or_default();
            let timeout = Duration::from_millis(this.cluster.cfg.ping_timeout_ms.max(2000));
            match this.cluster.request(&node, Op::Run(Box::new(this.run_of(&job))), timeout).await {
                Ok(Reply::Started | Reply::Known) => {
                    this.dispatching.remove(&job.id);
                    // Not waited for: a confirmation lost with a crash only means asking again
                    // (the agent answers `known`).
                    let _ = this.update_later(job.id, |j| j.confirmed = true);
                    return;
                }
                Ok(other) => warn!(job = job.id, ?other, "unexpected answer to a run"),
                // Not started, or not known to be: the scheduler asks again (the agent dedups).
                Err(e) => warn!(job = job.id, node, error = %e, "dispatch not confirmed"),
            }
            this.dispatching.insert(job.id, Dispatch::Failed(Instant::now()));
        });
    }

    fn check_lost(&self, id: u64) {
        let Some(node) = self.with(id, |j| j.node.clone()).flatten() else { return };
        let Some((state, changed)) = self.cluster.state(&node) else { return };
        let down_for = changed.elapsed().unwrap_or_default();
        if matches!(state, NodeState::Down(_)) && down_for > Duration::from_secs(self.cfg.lost_after_s) {
            let reason = format!("node {node} down for {} s", down_for.as_secs());
            warn!(job = id, node, "job lost");
            let _ = self.update(id, |j| {
                j.state = State::Lost;
                j.reason = reason;
                j.ended_ms = Some(now_ms());
            });
            self.end_lines(id, &node);
        }
    }

    /// Drops an ended job (with its tasks) once it is older than the retention.
    fn expire(&self, id: u64) {
        let Some(ended) = self.with(id, |j| j.ended_ms.unwrap_or(j.submitted_ms)) else { return };
        if now_ms().saturating_sub(ended) > self.cfg.retention_s.saturating_mul(1000) {
            let mut ids = self.scan(|j| j.task.is_some_and(|t| t.parent == id).then_some(j.id));
            ids.push(id);
            if let Err(e) = self.drop_records(&ids) {
                warn!(job = id, error = %e, "an expired job could not be removed; trying again later");
                return;
            }
            info!(job = id, "job expired");
        }
    }

    /// Runs the scheduler until the task is dropped: after changes (at most one pass per
    /// `PASS_GAP`, so a burst of changes is one pass) and every 200 ms.
    pub async fn scheduler(self: Arc<Self>) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let pass = Instant::now();
            self.schedule();
            if tokio::time::timeout(Duration::from_millis(200), notified).await.is_ok() {
                tokio::time::sleep_until((pass + PASS_GAP).into()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_cluster_is_seen_and_the_reason_it_repeats_is_recognized() {
        let mut free = Free::new(vec![("cn1".into(), 1, 1 << 30, 0.0)], (2, 1 << 30));
        assert_eq!(free.blocked(), None);
        assert_eq!(free.place(1, None), Ok("cn1".to_string()));
        assert_eq!(free.blocked(), Some(Blocked::Full));
        let why = free.place(2, None).unwrap_err();
        assert!(waits_for_cpus(&why, 2), "{why}");
        assert!(!waits_for_cpus(&why, 1));
        assert!(!waits_for_cpus("waiting for a node", 1));
        assert!(!waits_for_cpus("waiting for a node with 512 bytes of free memory", 1));
        assert_eq!(Free::new(Vec::new(), (0, 0)).blocked(), Some(Blocked::NoNode), "no node up");
        // Room given back and taken again is counted.
        free.give_back("cn1", 1, None);
        assert_eq!(free.blocked(), None);
        assert_eq!(free.pick(1, 1, None), Ok(vec!["cn1".to_string()]));
        assert_eq!(free.blocked(), Some(Blocked::Full));
        let mut two = Free::new(vec![("cn1".into(), 2, 1 << 30, 0.0), ("cn2".into(), 1, 1 << 30, 1.0)], (2, 1 << 30));
        two.take("cn1", 2, None);
        assert_eq!(two.blocked(), None);
        two.hold("cn2");
        assert_eq!(two.blocked(), Some(Blocked::Full));
    }

    #[test]
    fn a_size_no_node_has_is_told_apart_from_one_that_waits_for_room() {
        let mut free = Free::new(vec![("cn1".into(), 0, 1 << 30, 0.0)], (2, 2 << 30));
        let why = free.place(2, None).unwrap_err();
        assert!(waits_for_cpus(&why, 2), "two cpus exist, busy now: {why}");
        let why = free.place(64, None).unwrap_err();
        assert_eq!(why, "no node has 64 cpus (the most is 2): waiting for one that has");
        assert!(!waits_for_cpus(&why, 64));
        let why = free.place(1, Some(4 << 30)).unwrap_err();
        assert!(why.starts_with("no node has 4294967296 bytes of memory (the most is 2147483648)"), "{why}");
    }
}
