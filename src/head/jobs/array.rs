//! Array jobs: tasks start in index order under the `%` limit, each a run of its own; the job ends with its last task.

use std::sync::Arc;

use clusterfs_fs::FsError;
use dashmap::mapref::entry::Entry;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::schedule::{Deps, Free};
use super::{Job, Jobs, State, now_ms};

/// What makes a job an array task: its array job, its index, and its place in the index list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOf {
    pub parent: u64,
    /// An array task's index; for a multi-node job's run, its host (an index into the hosts).
    pub index: u32,
    pub pos: u32,
    /// For a multi-node job's run: its attempt (0 for the first).
    #[serde(default)]
    pub attempt: Option<u32>,
}

/// An array job's started tasks, counted by the scheduler in one pass.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub running: u32,
}

/// Task `t` of array job `p`, queued, not started.
fn new_task(p: &Job, t: TaskOf) -> Job {
    p.child(p.task_base + u64::from(t.pos), t)
}

/// `1,3-5,9`: indexes folded into ranges, at most `max` ranges shown.
fn ranges(indexes: &[u32], max: usize) -> String {
    let mut parts: Vec<(u32, u32)> = Vec::new();
    for &i in indexes {
        match parts.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(i) => *end = i,
            _ => parts.push((i, i)),
        }
    }
    let shown: Vec<String> =
        parts.iter().take(max).map(|&(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
    let more = if parts.len() > max { ",..." } else { "" };
    format!("{}{more}", shown.join(","))
}

impl Jobs {
    /// Task `index` of array job `parent` as its files show it: the task once started, else
    /// what the array job says of it.
    pub fn task(&self, parent: u64, index: u32) -> Option<Job> {
        let (base, pos) = self
            .with(parent, |p| {
                let pos = p.spec.array.as_ref()?.indexes.binary_search(&index).ok()?;
                Some((p.task_base, pos as u32))
            })
            .flatten()?;
        let id = base + u64::from(pos);
        if let Some(t) = self.jobs.get(&id) {
            return Some(t.clone());
        }
        // Tasks start in order: once the first has a record, the others wait for their turn.
        let first_started = self.jobs.contains_key(&base);
        self.with(parent, |p| {
            let (state, reason) = match (&p.killed_by, p.state) {
                (Some(who), _) => (State::Killed, format!("by {who} before it started")),
                (_, s) if s.ended() => (State::Failed, format!("never started: job {parent} ended {}", p.state_line())),
                (None, _) if !first_started => (State::Queued, p.reason.clone()),
                (None, _) => {
                    let limit = p.spec.array.as_ref().map_or(0, |a| a.limit);
                    let why = if limit > 0 { format!(", at most {limit} at once") } else { String::new() };
                    (State::Queued, format!("waiting for its turn (tasks start in index order{why})"))
                }
            };
            Job {
                state,
                reason,
                held: p.held,
                ended_ms: p.ended_ms,
                ..new_task(p, TaskOf { parent, index, pos, attempt: None })
            }
        })
    }

    /// Waits until task `index` of `parent` has ended (or, never started, the array job has).
    pub async fn wait_task(&self, parent: u64, index: u32) -> Result<Job, FsError> {
        self.wait_for(|| {
            self.task(parent, index).ok_or_else(|| FsError::not_found(format!("job {parent} task {index}")))
        })
        .await
    }

    /// `kill`/`signal` on one task: a started task like a job; one not started yet is marked
    /// killed so it never starts.
    pub async fn signal_task(&self, parent: u64, index: u32, signal: i32, who: &str) -> Result<(), FsError> {
        let task = self.task(parent, index).ok_or_else(|| FsError::not_found(format!("job {parent} task {index}")))?;
        if self.jobs.contains_key(&task.id) {
            return self.signal(task.id, signal, who).await;
        }
        if signal != libc::SIGTERM && signal != libc::SIGKILL {
            return Err(FsError::invalid(format!("task {index} of job {parent} has not started: only kill applies")));
        }
        if task.state.ended() {
            return Err(FsError::invalid(format!("task {index} of job {parent} has ended ({})", task.state_line())));
        }
        let killed = Job {
            state: State::Killed,
            reason: format!("by {who} before it started"),
            ended_ms: Some(now_ms()),
            ..task
        };
        self.insert_new(killed).map(|_| ())
    }

    /// Adds a task record unless one is there (the scheduler and a kill may race for it).
    fn insert_new(&self, job: Job) -> Result<bool, FsError> {
        let ticket = match self.jobs.entry(job.id) {
            Entry::Occupied(_) => return Ok(false),
            Entry::Vacant(v) => {
                let ticket = self.store_later(&job)?;
                self.track(&job);
                v.insert(job);
                ticket
            }
        };
        let durable = self.durable(ticket);
        self.changed.notify_waiters();
        durable.map(|()| true)
    }

    /// Starts what the limit and the free room allow of array job `id`'s tasks, and ends the
    /// job once its last task has.
    pub(super) fn advance_array(self: &Arc<Self>, id: u64, tally: Tally, free: &mut Free) {
        let Some((state, mut launched, killed, n, limit, cpus, mem, deps)) = self
            .with(id, |p| {
                let a = p.spec.array.as_ref()?;
                let deps = (p.launched == 0).then(|| (p.spec.after.clone(), p.spec.afterany.clone()));
                Some((
                    p.state,
                    p.launched,
                    p.killed_by.is_some(),
                    a.indexes.len() as u32,
                    a.limit,
                    p.spec.cpus,
                    p.spec.mem,
                    deps,
                ))
            })
            .flatten()
        else {
            return;
        };
        // Dependencies are looked up after the job is let go: no job is read inside another's read.
        match deps.map(|(after, afterany)| self.deps(&after, &afterany)) {
            Some(Deps::Wait(reason)) => return self.set_reason(id, reason),
            Some(Deps::Broken(reason)) => return self.fail_queued(id, reason),
            _ => {}
        }
        let mut running = tally.running;
        let mut no_room = None;
        while !killed && launched < n && (limit == 0 || running < limit) {
            let node = match free.place(cpus, mem) {
                Ok(node) => node,
                Err(reason) => {
                    no_room = Some(reason);
                    break;
                }
            };
            // A task killed before its turn is skipped; its room goes to the next one.
            if self.launch_task(id, launched, &node) {
                running += 1;
            } else {
                free.give_back(&node, cpus, mem);
            }
            launched += 1;
        }
        if running == 0 && (launched == n || killed) && state == State::Running {
            return self.settle_array(id, n);
        }
        // Tasks launched and not running have ended (or were killed before their turn).
        let ended = launched.saturating_sub(running);
        let reason = match (launched, no_room) {
            (0, Some(reason)) => reason,
            (0, None) => return,
            (_, Some(reason)) if running == 0 => format!("{reason} ({ended} of {n} tasks ended)"),
            _ => format!("{running} of {n} tasks running, {ended} ended"),
        };
        self.set_reason(id, reason);
    }

    /// Starts task `pos` of array job `parent` on `node`; false if that task has a record
    /// already (killed before it started).
    fn launch_task(self: &Arc<Self>, parent: u64, pos: u32, node: &str) -> bool {
        let Some(task) = self
            .with(parent, |p| {
                let index = *p.spec.array.as_ref()?.indexes.get(pos as usize)?;
                Some(Job {
                    state: State::Running,
                    node: Some(node.to_string()),
                    started_ms: Some(now_ms()),
                    ..new_task(p, TaskOf { parent, index, pos, attempt: None })
                })
            })
            .flatten()
        else {
            return false;
        };
        let started = self.insert_new(task.clone());
        let _ = self.update(parent, |p| {
            p.launched = p.launched.max(pos + 1);
            if p.state == State::Queued {
                p.state = State::Running;
                p.reason.clear();
                p.started_ms = Some(now_ms());
            }
        });
        match started {
            Ok(true) => {
                info!(job = parent, task = task.task.map_or(0, |t| t.index), node, "array task placed");
                self.dispatch(task);
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(job = parent, pos, error = %e, "cannot start an array task");
                false
            }
        }
    }

    /// Ends array job `id` after its last task: done if every task was, else failed (or
    /// killed) naming the tasks that were not.
    fn settle_array(&self, id: u64, n: u32) {
        let tasks = self.scan(|j| {
            let t = j.task.filter(|t| t.parent == id)?;
            Some((t.index, j.state, j.exit.as_ref().map(|e| e.code), j.started_ms.is_some()))
        });
        let started = tasks.iter().filter(|t| t.3).count();
        let bad: Vec<u32> = tasks.iter().filter(|t| t.1 != State::Done).map(|t| t.0).collect();
        let worst = tasks.iter().filter_map(|t| t.2).max();
        // Its own gathered lines, as for any job: a head whose spool has less says so.
        let spooled = self.output_lens(id);
        let _ = self.update(id, |p| {
            p.spooled = Some(spooled);
            let done = tasks.len() as u32 == n && bad.is_empty();
            p.state = match (&p.killed_by, done) {
                (Some(_), _) => State::Killed,
                (None, true) => State::Done,
                (None, false) => State::Failed,
            };
            p.reason = match (&p.killed_by, done) {
                (Some(who), _) => format!("by {who} ({started} of {n} tasks started)"),
                (None, true) => String::new(),
                (None, false) => format!("tasks {} of {n} did not succeed", ranges(&bad, 20)),
            };
            let code = match p.state {
                State::Failed => worst.filter(|&c| c != 0).unwrap_or(1),
                _ => worst.unwrap_or(0),
            };
            p.exit = (p.state != State::Killed || worst.is_some()).then_some(crate::jobs::Exit {
                code,
                signal: None,
                reason: None,
            });
            p.ended_ms = Some(now_ms());
        });
        info!(job = id, tasks = n, failed = bad.len(), "array job ended");
    }

    /// Where an array job's tasks run or ran, folded; a plain job's node.
    pub fn nodes_of(&self, job: &Job) -> String {
        if job.spec.array.is_none() {
            return job.node.clone().unwrap_or_default();
        }
        let mut set = crate::nodeset::NodeSet::new();
        for node in self.scan(|j| j.task.filter(|t| t.parent == job.id).and(j.node.clone())) {
            let _ = set.insert(&node);
        }
        set.fold()
    }
}

#[cfg(test)]
mod tests {
    use super::ranges;

    #[test]
    fn indexes_fold_into_ranges() {
        assert_eq!(ranges(&[1, 3, 4, 5, 9], 20), "1,3-5,9");
        assert_eq!(ranges(&[1, 3, 5], 2), "1,3,...");
        assert_eq!(ranges(&[], 2), "");
    }
}
