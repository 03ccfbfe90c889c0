//! Jobs on the head: the store, submission, control and waiting; scheduling and agents' reports are submodules.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use clusterfs_fs::{Errno, FsError};
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::JobsConfig;
use crate::head::cluster::Cluster;
use crate::head::store::Store;
use crate::jobs::spec::Nodes;
use crate::jobs::{Exit, STDOUT, Spec};
use crate::proto::{Op, Reply};

mod agents;
mod array;
mod copy;
mod multi;
mod schedule;

pub use agents::Stray;
pub use array::TaskOf;
pub use multi::{Outcome, Spread};

use schedule::Dispatch;

/// Who submitted a job, from the FUSE request of the first write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub user: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Running,
    Done,
    Failed,
    Killed,
    Timeout,
    Lost,
}

impl State {
    pub fn word(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
            State::Killed => "killed",
            State::Timeout => "timeout",
            State::Lost => "lost",
        }
    }

    pub fn ended(self) -> bool {
        !matches!(self, State::Queued | State::Running)
    }
}

/// Everything the store keeps of a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub owner: Owner,
    /// The spec as the user wrote it.
    pub text: Arc<str>,
    pub spec: Spec,
    pub state: State,
    pub reason: String,
    pub node: Option<String>,
    pub exit: Option<Exit>,
    /// Still being written through `jobs/new`: not schedulable yet.
    pub held: bool,
    /// The agent said it started (or knew) the run.
    pub confirmed: bool,
    /// Who asked for it to be killed, so its end reads `killed by <user>`.
    pub killed_by: Option<String>,
    pub submitted_ms: u64,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    /// For an array task: its array job and index (tasks are listed only under their job).
    #[serde(default)]
    pub task: Option<TaskOf>,
    /// For an array job: how many of its tasks, in index order, have been started.
    #[serde(default)]
    pub launched: u32,
    /// For an array job: the id of its first task; the others follow (taken from the job ids).
    #[serde(default)]
    pub task_base: u64,
    /// For a multi-node job: its nodes and attempts.
    #[serde(default)]
    pub spread: Option<Arc<Spread>>,
    /// For a copy job: the size of its file, once read.
    #[serde(default)]
    pub copy_size: Option<u64>,
    /// Once it ended: the bytes of stdout and stderr the head spooled, so that a head whose
    /// spool lacks them (another head's `shared_dir`) says so instead of showing less.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spooled: Option<[u64; 2]>,
}

/// What a job is made of, for the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Shape {
    /// One run on one node.
    One,
    /// Tasks started in index order.
    Array,
    /// One run on each of its nodes at once.
    Spread,
}

impl Job {
    /// `state` as the file shows it: the word, then what explains it.
    pub fn state_line(&self) -> String {
        let detail = match self.state {
            State::Queued if self.held => "being written".to_string(),
            State::Queued => self.reason.clone(),
            State::Running if self.spec.array.is_some() || self.spread.is_some() => self.reason.clone(),
            State::Running => format!("on {}", self.node.as_deref().unwrap_or("?")),
            State::Done | State::Failed => {
                let code = self.exit.as_ref().map_or(String::new(), |e| e.code.to_string());
                format!("{code} {}", self.reason).trim().to_string()
            }
            State::Killed | State::Timeout | State::Lost => self.reason.clone(),
        };
        if detail.is_empty() { self.state.word().into() } else { format!("{} {detail}", self.state.word()) }
    }

    pub fn name(&self) -> &str {
        self.spec.name.as_deref().unwrap_or("-")
    }

    pub(super) fn shape(&self) -> Shape {
        match (&self.spec.array, &self.spread) {
            (Some(_), _) => Shape::Array,
            (None, Some(_)) => Shape::Spread,
            (None, None) => Shape::One,
        }
    }

    /// One past the last job id this job holds: its own, and its array's tasks' (which take
    /// theirs when they start).
    fn ids_end(&self) -> u64 {
        (self.id + 1).max(self.task_base + self.spec.tasks())
    }

    /// A run `id` of this job (an array task, or a multi-node job's run on one node), queued;
    /// it runs this job's script, read from the job when sent rather than stored once per run.
    fn child(&self, id: u64, of: TaskOf) -> Job {
        let spec = Spec {
            script: "".into(),
            nodes: Nodes::Count(1),
            after: Vec::new(),
            afterany: Vec::new(),
            array: None,
            ..self.spec.clone()
        };
        Job {
            id,
            owner: self.owner.clone(),
            text: "".into(),
            spec,
            state: State::Queued,
            reason: String::new(),
            node: None,
            exit: None,
            held: false,
            confirmed: false,
            killed_by: None,
            submitted_ms: self.submitted_ms,
            started_ms: None,
            ended_ms: None,
            task: Some(of),
            launched: 0,
            task_base: 0,
            spread: None,
            copy_size: None,
            spooled: None,
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Only root may put a job ahead of others.
fn check_priority(owner: &Owner, spec: &Spec) -> Result<(), FsError> {
    if spec.priority > 0 && owner.uid != 0 {
        return Err(FsError::new(Errno::Perm, "priority: only root may set a priority above 0"));
    }
    Ok(())
}

/// All jobs.
#[derive(Debug)]
pub struct Jobs {
    pub cfg: JobsConfig,
    cluster: Arc<Cluster>,
    spool: PathBuf,
    jobs: DashMap<u64, Job>,
    next_id: AtomicU64,
    /// Woken on every change a waiter or the scheduler may care about.
    pub changed: Notify,
    /// Runs whose start is not confirmed yet: asked now, or asked and not answered.
    dispatching: DashMap<u64, Dispatch>,
    /// Bytes each copy run has written on its node, as its agent last said.
    copied: DashMap<u64, u64>,
    /// The output of a multi-node or array job's runs past their last whole line, by (run,
    /// stream): it joins the job's own stdout or stderr once its line is complete.
    partial: DashMap<(u64, u64), Vec<u8>>,
    /// The cluster secret: the head authenticates to the relays it feeds.
    secret: Arc<crate::auth::Secret>,
    /// Ids of the jobs not ended (and some that ended since) but those in `room`: what a
    /// scheduler pass reads, not the thousands kept for retention. Every write of a job not
    /// ended adds it.
    active: dashmap::DashSet<u64>,
    /// Queued jobs told they wait for free cpus (or for a node to be up) and waiting for
    /// nothing else, by (-priority, id): the start order. Kept out of `active`: a pass takes
    /// them from the front only while a node has a free cpu, so thousands waiting cost a pass
    /// on a full cluster, or one with no node up, nothing.
    room: std::sync::Mutex<std::collections::BTreeSet<(i32, u64)>>,
    /// When a scheduler pass last read every job.
    full_pass_at: std::sync::Mutex<Option<std::time::Instant>>,
    /// Why no waiter could start at the last pass's start, if none could: a pass that finds
    /// the same skips the waiting room, whose jobs were told so already.
    room_blocked: std::sync::Mutex<Option<schedule::Blocked>>,
}

impl Jobs {
    /// Loads jobs from the store; jobs caught being written when the head stopped are released.
    pub fn load(
        cfg: JobsConfig,
        cluster: Arc<Cluster>,
        spool: PathBuf,
        secret: Arc<crate::auth::Secret>,
    ) -> Result<Jobs, crate::head::store::StoreError> {
        std::fs::create_dir_all(&spool).map_err(|e| crate::head::store::StoreError::Db(e.to_string()))?;
        crate::jobs::spread_subdirectories(&spool);
        let jobs = DashMap::new();
        // Past every id a stored job has or holds for its tasks (a removal stores the counter).
        let mut next = 1;
        for (_, mut job) in cluster.store().scan::<Job>("jobs")? {
            next = next.max(job.ids_end());
            if job.held {
                job.held = false;
                cluster.store().put("jobs", &job.id.to_string(), &job)?;
            }
            jobs.insert(job.id, job);
        }
        // A task stored just before its array job's count: the count follows the tasks.
        let tasks: Vec<TaskOf> = jobs.iter().filter_map(|j| j.task.filter(|t| t.attempt.is_none())).collect();
        for t in tasks {
            if let Some(mut parent) = jobs.get_mut(&t.parent) {
                parent.launched = parent.launched.max(t.pos + 1);
            }
        }
        let stored: u64 =
            cluster.store().scan::<u64>("meta")?.into_iter().find(|(k, _)| k == "next_job").map_or(1, |(_, v)| v);
        let active = jobs.iter().filter(|j| !j.state.ended()).map(|j| j.id).collect();
        Ok(Jobs {
            cfg,
            cluster,
            spool,
            jobs,
            next_id: AtomicU64::new(stored.max(next)),
            changed: Notify::new(),
            dispatching: DashMap::new(),
            copied: DashMap::new(),
            partial: DashMap::new(),
            secret,
            active,
            room: std::sync::Mutex::default(),
            full_pass_at: std::sync::Mutex::new(None),
            room_blocked: std::sync::Mutex::new(None),
        })
    }

    /// A copy of job `id` (its spec text and script are shared, not copied).
    pub fn get(&self, id: u64) -> Option<Job> {
        self.jobs.get(&id).map(|j| j.clone())
    }

    /// Reads job `id` in place, without copying it.
    pub fn with<T>(&self, id: u64, f: impl FnOnce(&Job) -> T) -> Option<T> {
        self.jobs.get(&id).map(|j| f(&j))
    }

    /// What `f` takes from each job, in id order, without copying the jobs. `f` must not
    /// touch the jobs (their map is locked while it runs).
    pub fn scan<T>(&self, mut f: impl FnMut(&Job) -> Option<T>) -> Vec<T> {
        let mut v: Vec<(u64, T)> = self.jobs.iter().filter_map(|j| f(&j).map(|t| (j.id, t))).collect();
        v.sort_unstable_by_key(|x| x.0);
        v.into_iter().map(|x| x.1).collect()
    }

    /// A job as users see it at `jobs/<id>`: array tasks are only under their job.
    pub fn job(&self, id: u64) -> Option<Job> {
        self.jobs.get(&id).filter(|j| j.task.is_none()).map(|j| j.clone())
    }

    /// Ids of the jobs listed in `jobs/` (not array tasks).
    pub fn ids(&self) -> Vec<u64> {
        self.scan(|j| j.task.is_none().then_some(j.id))
    }

    /// `jobs/queue`: one line per job not yet ended (an array job: where its tasks run).
    pub fn queue(&self) -> String {
        let mut where_tasks: std::collections::HashMap<u64, crate::nodeset::NodeSet> = Default::default();
        for (parent, node) in
            self.scan(|j| Some((j.task?.parent, j.node.clone()?)).filter(|_| j.state == State::Running))
        {
            let _ = where_tasks.entry(parent).or_default().insert(&node);
        }
        self.scan(|j| {
            let state = if j.held { "writing" } else { j.state.word() };
            let node = match where_tasks.get(&j.id) {
                Some(set) => set.fold(),
                None => j.node.clone().unwrap_or_else(|| "-".into()),
            };
            (!j.state.ended() && j.task.is_none())
                .then(|| format!("{} {} {} {} {}\n", j.id, j.owner.user, state, node, j.name()))
        })
        .concat()
    }

    /// Whether run `run` is running on `node` (what agents may report about).
    fn runs_on(&self, run: u64, node: &str) -> bool {
        self.with(run, |j| j.state == State::Running && j.node.as_deref() == Some(node)).unwrap_or(false)
    }

    /// Tells `node`'s agent, from a task, that it may drop `run`.
    fn forget_later(&self, node: &str, run: u64) {
        let (cluster, node) = (self.cluster.clone(), node.to_string());
        tokio::spawn(async move {
            let _ = cluster.request(&node, Op::Forget { run }, Duration::from_secs(5)).await;
        });
    }

    /// Tells `node`'s agent it may drop `run` once the store has what `ticket` carries (its end):
    /// until then the agent keeps it, so a head that stops first learns the end again.
    fn forget_when_durable(self: &Arc<Self>, node: &str, run: u64, ticket: u64) {
        let (this, node) = (self.clone(), node.to_string());
        tokio::spawn(async move {
            let jobs = this.clone();
            if let Ok(Ok(())) = tokio::task::spawn_blocking(move || jobs.durable(ticket)).await {
                this.forget_later(&node, run);
            }
        });
    }

    pub fn spool_path(&self, id: u64, stream: u64) -> PathBuf {
        self.spool.join(id.to_string()).join(if stream == STDOUT { "stdout" } else { "stderr" })
    }

    pub fn output_len(&self, id: u64, stream: u64) -> u64 {
        std::fs::metadata(self.spool_path(id, stream)).map_or(0, |m| m.len())
    }

    /// Bytes of job `id`'s stdout and stderr on this head's spool.
    pub fn output_lens(&self, id: u64) -> [u64; 2] {
        [self.output_len(id, crate::jobs::STDOUT), self.output_len(id, crate::jobs::STDERR)]
    }

    /// Queues `job` for the next store commit; its ticket, for `durable`. Called with the job
    /// locked, so its changes reach the store in the order they happened.
    fn store_later(&self, job: &Job) -> Result<u64, FsError> {
        let change = Store::change("jobs", &job.id.to_string(), job).map_err(FsError::from)?;
        Ok(self.cluster.store().write_later(vec![change]))
    }

    /// Keeps a job not ended in the scheduler's index; call with every job written.
    fn track(&self, job: &Job) {
        if !job.state.ended() {
            self.active.insert(job.id);
        }
    }

    /// Applies `f` to job `id` and stores the result; returns once it is durable. The job is
    /// locked while it changes and its new value is queued for the store, so concurrent
    /// updates (the scheduler, a kill, an agent's report) never undo each other and reach the
    /// store in the order they happened; the commit is waited for after the lock is let go, so
    /// no reader of the job (a FUSE thread) waits on the disk.
    fn update(&self, id: u64, f: impl FnOnce(&mut Job)) -> Result<Job, FsError> {
        let (job, ticket) = self.update_later(id, f)?;
        self.durable(ticket).map(|()| job)
    }

    /// `update` without waiting for the store: the new job and the ticket its commit has. For
    /// the paths that must not hold a task on the disk (many agents' reports at once share one
    /// commit instead of each waiting for its own).
    fn update_later(&self, id: u64, f: impl FnOnce(&mut Job)) -> Result<(Job, u64), FsError> {
        let (job, ticket) = {
            let mut entry = self.jobs.get_mut(&id).ok_or_else(|| FsError::not_found(format!("job {id}")))?;
            let mut job = entry.clone();
            f(&mut job);
            let ticket = self.store_later(&job)?;
            self.track(&job);
            *entry = job.clone();
            (job, ticket)
        };
        self.changed.notify_waiters();
        Ok((job, ticket))
    }

    /// Creates a job from a checked spec; `held` while its writer may still add to it. Returns
    /// its id and the store ticket to wait on (`durable`) before telling anyone it exists.
    pub fn submit(&self, owner: Owner, text: String, spec: Spec, held: bool) -> Result<(u64, u64), FsError> {
        if owner.uid == 0 && !self.cfg.allow_root {
            return Err(FsError::new(
                Errno::Perm,
                "root jobs are forbidden by this cluster's configuration (jobs.allow_root)",
            ));
        }
        let spread = self.spread_of(&spec)?;
        check_priority(&owner, &spec)?;
        Jobs::check_copy(&owner, &spec)?;
        for dep in spec.after.iter().chain(&spec.afterany) {
            if self.jobs.get(dep).is_none_or(|j| j.task.is_some()) {
                return Err(FsError::invalid(format!("after: job {dep} does not exist")));
            }
        }
        // An array's tasks take the ids after it, so each run has an id of its own.
        let tasks = spec.tasks();
        let id = self.next_id.fetch_add(1 + tasks, Ordering::SeqCst);
        let job = Job {
            id,
            owner,
            text: text.into(),
            spec,
            state: State::Queued,
            reason: "waiting for a node".into(),
            node: None,
            exit: None,
            held,
            confirmed: false,
            killed_by: None,
            submitted_ms: now_ms(),
            started_ms: None,
            ended_ms: None,
            task: None,
            launched: 0,
            task_base: id + 1,
            spread,
            copy_size: None,
            spooled: None,
        };
        // Committed with the next commit: concurrent submissions share one. The job's record
        // holds its ids (see `Job::ids_end`), so submissions share no key.
        let change = Store::change("jobs", &id.to_string(), &job).map_err(FsError::from)?;
        let ticket = self.cluster.store().write_later(vec![change]);
        info!(job = id, user = job.owner.user, held, "job submitted");
        self.track(&job);
        self.jobs.insert(id, job);
        self.changed.notify_waiters();
        Ok((id, ticket))
    }

    /// Replaces a held job's spec (a later write of the same `jobs/new` handle).
    /// With `release`, the writer is done and the job may run (one store write for both).
    /// Returns the ticket of the store write, for `durable`.
    pub fn amend(&self, id: u64, text: String, spec: Spec, release: bool) -> Result<u64, FsError> {
        let spread = self.spread_of(&spec)?;
        let (owner, tasks) = self
            .with(id, |j| (j.owner.clone(), j.spec.tasks()))
            .ok_or_else(|| FsError::not_found(format!("job {id}")))?;
        check_priority(&owner, &spec)?;
        Jobs::check_copy(&owner, &spec)?;
        // An array that grew as its spec was written takes a new block of ids for its tasks.
        let want = spec.tasks();
        let base = if want > tasks {
            // Held by the job's record from the same commit on.
            Some(self.next_id.fetch_add(want, Ordering::SeqCst))
        } else {
            None
        };
        // Nothing waits for the disk here: the writer's close waits for the ticket (the last
        // piece's covers the earlier ones), and a released job rides on the next commit (its
        // placement at the latest); a head that restarts first releases held jobs itself.
        let (_, ticket) = self.update_later(id, |j| {
            j.text = text.into();
            j.spec = spec;
            j.spread = spread;
            if let Some(base) = base {
                j.task_base = base;
            }
            if release {
                j.held = false;
            }
        })?;
        Ok(ticket)
    }

    /// Returns once what `submit` stored under `ticket` is committed.
    pub fn durable(&self, ticket: u64) -> Result<(), FsError> {
        self.cluster.store().wait(ticket).map_err(FsError::from)
    }

    /// Ends a job that never started, with the reason (a spec found broken when complete).
    pub fn fail(&self, id: u64, reason: &str) {
        let _ = self.update(id, |j| {
            if j.state == State::Queued {
                j.state = State::Failed;
                j.reason = reason.to_string();
                j.ended_ms = Some(now_ms());
            }
        });
    }

    /// The writer is done: the job may run.
    pub fn release(&self, id: u64) {
        if self.with(id, |j| j.held).unwrap_or(false) {
            // As in `amend`: nobody waits for this commit.
            if let Err(e) = self.update_later(id, |j| j.held = false) {
                warn!(job = id, error = %e, "could not release the job");
            }
        }
    }

    /// `kill` / `signal` from `ctl`, by `who`. For an array or multi-node job: every running run,
    /// and a kill starts no more of them.
    pub async fn signal(&self, id: u64, signal: i32, who: &str) -> Result<(), FsError> {
        let (state, shape, line) = self
            .with(id, |j| (j.state, j.shape(), j.state_line()))
            .ok_or_else(|| FsError::not_found(format!("job {id}")))?;
        let kill = signal == libc::SIGTERM || signal == libc::SIGKILL;
        match state {
            State::Queued if kill => {
                self.update(id, |j| {
                    j.state = State::Killed;
                    j.reason = format!("by {who} before it started");
                    j.ended_ms = Some(now_ms());
                })?;
                Ok(())
            }
            State::Queued => Err(FsError::invalid(format!("job {id} is queued: only kill applies"))),
            State::Running if shape != Shape::One => {
                if kill {
                    self.update(id, |j| j.killed_by = Some(who.to_string()))?;
                }
                // Every node's run is signalled, even when one cannot be: the first error says why.
                let mut first_error = Ok(());
                for task in self.scan(|j| (j.task?.parent == id && j.state == State::Running).then_some(j.id)) {
                    if let Err(e) = self.signal_run(task, signal, who).await {
                        first_error = first_error.and(Err(e));
                    }
                }
                first_error
            }
            State::Running => self.signal_run(id, signal, who).await,
            _ => Err(FsError::invalid(format!("job {id} has ended ({line})"))),
        }
    }

    /// Signals one running run through its node's agent; a kill escalates to SIGKILL.
    async fn signal_run(&self, id: u64, signal: i32, who: &str) -> Result<(), FsError> {
        let Some(node) = self.with(id, |j| j.node.clone()).flatten() else {
            return Err(FsError::new(Errno::NoEnt, format!("job {id} is on no node")));
        };
        let kill = signal == libc::SIGTERM || signal == libc::SIGKILL;
        if kill {
            self.update(id, |j| j.killed_by = Some(who.to_string()))?;
        }
        let timeout = Duration::from_millis(self.cluster.cfg.ping_timeout_ms);
        // A run placed a moment ago may not have its process yet: its supervisor starts it
        // within milliseconds, so ask again for a little while.
        let mut tries = 0;
        loop {
            match self.cluster.request(&node, Op::Signal { run: id, signal }, timeout).await {
                // A run that has ended meanwhile (its agent has forgotten it) needs no signal.
                Ok(Reply::NotYet) if !self.with(id, |j| j.state == State::Running).unwrap_or(false) => return Ok(()),
                Ok(Reply::NotYet) => {
                    tries += 1;
                    if tries > 50 {
                        return Err(FsError::new(
                            Errno::Again,
                            format!("job {id} has not started on {node} yet; try again"),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(_) => break,
                // A node slow to answer (a loaded machine): the kill is recorded, and asked
                // again until the node answers; the caller is not left with ETIMEDOUT.
                Err(e) if kill && e.errno == Errno::TimedOut => {
                    warn!(job = id, node, error = %e, "a kill was not answered in time: asking again");
                    tokio::spawn(kill_again(self.cluster.clone(), node, id, signal, timeout));
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        if signal == libc::SIGTERM {
            tokio::spawn(escalate(self.cluster.clone(), node, id, timeout));
        }
        Ok(())
    }

    /// Forgets jobs (a job and its tasks): their records in one store write, their spools,
    /// their dispatch state. The id counter is stored with the removal, so that no later head
    /// gives their ids again.
    fn drop_records(&self, ids: &[u64]) -> Result<(), FsError> {
        let next = self.next_id.load(Ordering::SeqCst);
        let mut changes: Vec<_> = ids.iter().map(|id| (format!("jobs/{id}"), None)).collect();
        changes.push(Store::change("meta", "next_job", &next).map_err(FsError::from)?);
        self.cluster.store().write(changes).map_err(FsError::from)?;
        for id in ids {
            self.jobs.remove(id);
            self.active.remove(id);
            self.dispatching.remove(id);
            let _ = std::fs::remove_dir_all(self.spool.join(id.to_string()));
        }
        Ok(())
    }

    /// Opens a job's output spool to append, making it with the first output (a job that
    /// prints nothing has none: it reads as empty).
    fn open_spool(&self, id: u64, stream: u64) -> std::io::Result<std::fs::File> {
        let open = || std::fs::OpenOptions::new().append(true).create(true).open(self.spool_path(id, stream));
        match open() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(self.spool.join(id.to_string()))?;
                open()
            }
            other => other,
        }
    }

    /// Up to `len` bytes of a job's output from `offset` (none before its first output). An
    /// error when this head's spool holds less than was spooled when the job ended.
    pub fn read_output(&self, id: u64, stream: u64, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let spooled = self.with(id, |j| j.spooled).flatten().map_or(0, |s| s[usize::from(stream != STDOUT)]);
        // Only an ended job's output is looked at first (a running one's grows here).
        if let Some(here) = (spooled > 0).then(|| self.output_len(id, stream)).filter(|here| *here < spooled) {
            return Err(std::io::Error::other(format!(
                "{spooled} bytes were spooled when job {id} ended, and this head's spool has {here}: the rest is \
                 in another head's spool (give every head the same shared_dir) or was removed"
            )));
        }
        crate::jobs::read_spooled(&self.spool_path(id, stream), offset, len)
    }

    /// `rmdir jobs/<id>`: kills it if running and removes it with its output (and its tasks).
    pub async fn remove(&self, id: u64) -> Result<(), FsError> {
        let mut runs = self.scan(|j| (j.task.is_some_and(|t| t.parent == id)).then_some(j.id));
        runs.push(id);
        for &run in &runs {
            let Some((state, node)) = self.with(run, |j| (j.state, j.node.clone())) else { continue };
            if let (State::Running, Some(node)) = (state, node) {
                let timeout = Duration::from_millis(self.cluster.cfg.ping_timeout_ms);
                // The agent kills a run it is told to forget; a down node is told when it returns.
                let _ = self.cluster.request(&node, Op::Forget { run }, timeout).await;
            }
        }
        // One store write for them all: an array job's 100,000 tasks are not 100,000 commits.
        self.drop_records(&runs)?;
        self.changed.notify_waiters();
        info!(job = id, "job removed");
        Ok(())
    }

    /// Waits until job `id` ends; its final state.
    pub async fn wait(&self, id: u64) -> Result<Job, FsError> {
        self.wait_for(|| {
            self.get(id).ok_or_else(|| FsError::new(Errno::NoEnt, format!("job {id} was removed while waited on")))
        })
        .await
    }

    /// Waits until the job `look` finds has ended.
    async fn wait_for(&self, look: impl Fn() -> Result<Job, FsError>) -> Result<Job, FsError> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let job = look()?;
            if job.state.ended() {
                return Ok(job);
            }
            notified.await;
        }
    }
}

/// A job that ignores SIGTERM gets SIGKILL a second later.
async fn escalate(cluster: Arc<Cluster>, node: String, run: u64, timeout: Duration) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = cluster.request(&node, Op::Signal { run, signal: libc::SIGKILL }, timeout).await;
}

/// Sends a kill that got no answer again, every second for up to a minute, until the node
/// answers (a run that has ended meanwhile is not signalled by its agent).
async fn kill_again(cluster: Arc<Cluster>, node: String, run: u64, signal: i32, timeout: Duration) {
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match cluster.request(&node, Op::Signal { run, signal }, timeout).await {
            Ok(Reply::NotYet) => continue,
            Err(e) if e.errno == Errno::TimedOut => continue,
            Ok(_) if signal == libc::SIGTERM => return escalate(cluster, node, run, timeout).await,
            _ => return,
        }
    }
    warn!(job = run, node, "a kill was never answered");
}
