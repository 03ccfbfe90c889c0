//! The scheduler: dependencies, placement, dispatch to agents, lost nodes and retention.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::{Job, Jobs, State, now_ms};
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

/// How long after an unconfirmed start request the scheduler asks again.
const REDISPATCH_AFTER: Duration = Duration::from_secs(2);

impl Jobs {
    /// One pass of the scheduler: dependencies, placement, lost nodes, retention.
    pub fn schedule(self: &Arc<Self>) {
        let mut reserved: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for j in self.jobs.iter().filter(|j| j.state == State::Running) {
            if let Some(n) = &j.node {
                let r = reserved.entry(n.clone()).or_default();
                r.0 += u64::from(j.spec.cpus);
                r.1 += j.spec.mem.unwrap_or(0);
            }
        }
        // Only jobs that may start are copied; the others are looked at in place.
        for (id, state, held) in self.scan(|j| Some((j.id, j.state, j.held))) {
            match state {
                State::Queued if !held => {
                    if let Some(job) = self.get(id) {
                        self.try_start(job, &mut reserved);
                    }
                }
                State::Running => {
                    self.check_lost(id);
                    self.redispatch(id);
                }
                s if s.ended() => self.expire(id),
                _ => {}
            }
        }
    }

    fn try_start(self: &Arc<Self>, job: Job, reserved: &mut BTreeMap<String, (u64, u64)>) {
        // Dependencies first.
        for (deps, need_ok) in [(&job.spec.after, true), (&job.spec.afterany, false)] {
            for dep in deps {
                match self.get(*dep) {
                    Some(d) if !d.state.ended() => return self.set_reason(&job, format!("waiting for job {dep}")),
                    Some(d) if need_ok && d.state != State::Done => {
                        let reason = format!("dependency {dep} ended {}", d.state_line());
                        let _ = self.update(job.id, |j| {
                            j.state = State::Failed;
                            j.reason = reason;
                            j.ended_ms = Some(now_ms());
                        });
                        return;
                    }
                    _ => {}
                }
            }
        }
        let mut best: Option<(f64, String)> = None;
        let (mut any_up, mut max_cpus, mut max_mem) = (false, 0u64, 0u64);
        for name in self.cluster.names() {
            let Some(v) = self.cluster.view(&name) else { continue };
            if v.state != NodeState::Up {
                continue;
            }
            any_up = true;
            let (cpus, mem) = reserved.get(&name).copied().unwrap_or_default();
            let free_cpus = v.report.cpus.saturating_sub(cpus);
            let free_mem = v.report.mem_total.saturating_sub(mem);
            max_cpus = max_cpus.max(free_cpus);
            max_mem = max_mem.max(free_mem);
            if free_cpus >= u64::from(job.spec.cpus) && free_mem >= job.spec.mem.unwrap_or(0) {
                let load = v.report.load_index();
                if best.as_ref().is_none_or(|(l, _)| load < *l) {
                    best = Some((load, name));
                }
            }
        }
        let Some((_, node)) = best else {
            let reason = if !any_up {
                "waiting for a node to be up".to_string()
            } else if u64::from(job.spec.cpus) > max_cpus {
                format!("waiting for a node with {} free cpus", job.spec.cpus)
            } else {
                format!("waiting for a node with {} bytes of free memory", job.spec.mem.unwrap_or(0))
            };
            return self.set_reason(&job, reason);
        };
        let r = reserved.entry(node.clone()).or_default();
        r.0 += u64::from(job.spec.cpus);
        r.1 += job.spec.mem.unwrap_or(0);
        // The run now belongs to this node: from here it is only ever resent there.
        let Ok(job) = self.update(job.id, |j| {
            j.state = State::Running;
            j.node = Some(node.clone());
            j.reason.clear();
            j.started_ms = Some(now_ms());
        }) else {
            return;
        };
        info!(job = job.id, node, "job placed");
        self.dispatch(job);
    }

    fn set_reason(&self, job: &Job, reason: String) {
        if job.reason != reason {
            let _ = self.update(job.id, |j| j.reason = reason);
        }
    }

    /// The run request for a placed job.
    fn run_of(&self, job: &Job) -> Run {
        let node = job.node.clone().unwrap_or_default();
        let mut env = job.spec.env.clone();
        env.insert("CLUSTER_JOB_ID".into(), job.id.to_string());
        env.insert("CLUSTER_NODE".into(), node.clone());
        env.insert("CLUSTER_NODES".into(), node);
        env.insert("CLUSTER_ARRAY_INDEX".into(), String::new());
        Run {
            run: job.id,
            script: job.spec.script.clone(),
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
        let connected = self.cluster.view(&node).is_some_and(|v| !matches!(v.state, NodeState::Down(_)));
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
                    let _ = this.update(job.id, |j| j.confirmed = true);
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
        let Some(v) = self.cluster.view(&node) else { return };
        let down_for = v.changed.elapsed().unwrap_or_default();
        if matches!(v.state, NodeState::Down(_)) && down_for > Duration::from_secs(self.cfg.lost_after_s) {
            let reason = format!("node {node} down for {} s", down_for.as_secs());
            warn!(job = id, node, "job lost");
            let _ = self.update(id, |j| {
                j.state = State::Lost;
                j.reason = reason;
                j.ended_ms = Some(now_ms());
            });
        }
    }

    fn expire(&self, id: u64) {
        let Some(ended) = self.with(id, |j| j.ended_ms.unwrap_or(j.submitted_ms)) else { return };
        if now_ms().saturating_sub(ended) > self.cfg.retention_s.saturating_mul(1000) {
            let _ = self.cluster.store().delete("jobs", &id.to_string());
            self.jobs.remove(&id);
            self.dispatching.remove(&id);
            let _ = std::fs::remove_dir_all(self.spool.join(id.to_string()));
        }
    }
    /// Runs the scheduler until the task is dropped: on every change and every 200 ms.
    pub async fn scheduler(self: Arc<Self>) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.schedule();
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }
}
