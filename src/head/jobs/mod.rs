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
use crate::jobs::spec::Nodes;
use crate::jobs::{Exit, STDERR, STDOUT, Spec};
use crate::proto::Op;

mod agents;
mod schedule;

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
    pub text: String,
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
}

impl Job {
    /// `state` as the file shows it: the word, then what explains it.
    pub fn state_line(&self) -> String {
        let detail = match self.state {
            State::Queued if self.held => "being written".to_string(),
            State::Queued => self.reason.clone(),
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
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn store_err(e: crate::head::store::StoreError) -> FsError {
    FsError::new(Errno::Io, format!("the store failed: {e}"))
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
}

impl Jobs {
    /// Loads jobs from the store; jobs caught being written when the head stopped are released.
    pub fn load(
        cfg: JobsConfig,
        cluster: Arc<Cluster>,
        spool: PathBuf,
    ) -> Result<Jobs, crate::head::store::StoreError> {
        std::fs::create_dir_all(&spool).map_err(|e| crate::head::store::StoreError::Db(e.to_string()))?;
        let jobs = DashMap::new();
        let mut max = 0;
        for (_, mut job) in cluster.store().scan::<Job>("jobs")? {
            max = max.max(job.id);
            if job.held {
                job.held = false;
                cluster.store().put("jobs", &job.id.to_string(), &job)?;
            }
            jobs.insert(job.id, job);
        }
        let stored: u64 =
            cluster.store().scan::<u64>("meta")?.into_iter().find(|(k, _)| k == "next_job").map_or(1, |(_, v)| v);
        Ok(Jobs {
            cfg,
            cluster,
            spool,
            jobs,
            next_id: AtomicU64::new(stored.max(max + 1)),
            changed: Notify::new(),
            dispatching: DashMap::new(),
        })
    }

    /// A copy of job `id` (with its spec text: for what needs the whole job).
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

    pub fn ids(&self) -> Vec<u64> {
        self.scan(|j| Some(j.id))
    }

    /// `jobs/queue`: one line per job not yet ended.
    pub fn queue(&self) -> String {
        self.scan(|j| {
            let state = if j.held { "writing" } else { j.state.word() };
            (!j.state.ended()).then(|| {
                format!("{} {} {} {} {}\n", j.id, j.owner.user, state, j.node.as_deref().unwrap_or("-"), j.name())
            })
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

    pub fn spool_path(&self, id: u64, stream: u64) -> PathBuf {
        self.spool.join(id.to_string()).join(if stream == STDOUT { "stdout" } else { "stderr" })
    }

    pub fn output_len(&self, id: u64, stream: u64) -> u64 {
        std::fs::metadata(self.spool_path(id, stream)).map_or(0, |m| m.len())
    }

    fn persist(&self, job: &Job) -> Result<(), FsError> {
        self.cluster.store().put("jobs", &job.id.to_string(), job).map_err(store_err)
    }

    /// Applies `f` to job `id` and stores the result.
    fn update(&self, id: u64, f: impl FnOnce(&mut Job)) -> Result<Job, FsError> {
        let mut job = self.get(id).ok_or_else(|| FsError::not_found(format!("job {id}")))?;
        f(&mut job);
        self.persist(&job)?;
        self.jobs.insert(id, job.clone());
        self.changed.notify_waiters();
        Ok(job)
    }

    /// Creates a job from a checked spec; `held` while its writer may still add to it.
    pub fn submit(&self, owner: Owner, text: String, spec: Spec, held: bool) -> Result<u64, FsError> {
        if owner.uid == 0 && !self.cfg.allow_root {
            return Err(FsError::new(
                Errno::Perm,
                "root jobs are forbidden by this cluster's configuration (jobs.allow_root)",
            ));
        }
        self.check_supported(&spec)?;
        for dep in spec.after.iter().chain(&spec.afterany) {
            if !self.jobs.contains_key(dep) {
                return Err(FsError::invalid(format!("after: job {dep} does not exist")));
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        std::fs::create_dir_all(self.spool.join(id.to_string()))
            .map_err(|e| FsError::new(Errno::Io, format!("cannot make the spool of job {id}: {e}")))?;
        for stream in [STDOUT, STDERR] {
            std::fs::write(self.spool_path(id, stream), b"")
                .map_err(|e| FsError::new(Errno::Io, format!("cannot make the spool of job {id}: {e}")))?;
        }
        let job = Job {
            id,
            owner,
            text,
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
        };
        self.persist(&job)?;
        self.cluster.store().put("meta", "next_job", &(id + 1)).map_err(store_err)?;
        info!(job = id, user = job.owner.user, held, "job submitted");
        self.jobs.insert(id, job);
        self.changed.notify_waiters();
        Ok(id)
    }

    /// Parts of the spec language whose scheduling is not built yet are refused, not ignored.
    fn check_supported(&self, spec: &Spec) -> Result<(), FsError> {
        match &spec.nodes {
            Nodes::Count(1) => {}
            Nodes::Count(_) | Nodes::Set(_) => {
                return Err(FsError::new(Errno::NoSys, "nodes: multi-node jobs are not supported by this head yet"));
            }
        }
        if spec.array.is_some() {
            return Err(FsError::new(Errno::NoSys, "array: array jobs are not supported by this head yet"));
        }
        Ok(())
    }

    /// Replaces a held job's spec (a later write of the same `jobs/new` handle).
    pub fn amend(&self, id: u64, text: String, spec: Spec) -> Result<(), FsError> {
        self.check_supported(&spec)?;
        self.update(id, |j| {
            j.text = text;
            j.spec = spec;
        })
        .map(|_| ())
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
        if self.get(id).is_some_and(|j| j.held) {
            if let Err(e) = self.update(id, |j| j.held = false) {
                warn!(job = id, error = %e, "could not release the job");
            }
        }
    }

    /// `kill` / `signal` from `ctl`, by `who`.
    pub async fn signal(&self, id: u64, signal: i32, who: &str) -> Result<(), FsError> {
        let job = self.get(id).ok_or_else(|| FsError::not_found(format!("job {id}")))?;
        match job.state {
            State::Queued => {
                if signal == libc::SIGTERM || signal == libc::SIGKILL {
                    self.update(id, |j| {
                        j.state = State::Killed;
                        j.reason = format!("by {who} before it started");
                        j.ended_ms = Some(now_ms());
                    })?;
                    Ok(())
                } else {
                    Err(FsError::invalid(format!("job {id} is queued: only kill applies")))
                }
            }
            State::Running => {
                let node = job.node.clone().unwrap_or_default();
                if signal == libc::SIGTERM || signal == libc::SIGKILL {
                    self.update(id, |j| j.killed_by = Some(who.to_string()))?;
                }
                let timeout = Duration::from_millis(self.cluster.cfg.ping_timeout_ms);
                self.cluster.request(&node, Op::Signal { run: id, signal }, timeout).await?;
                if signal == libc::SIGTERM {
                    // A job that ignores SIGTERM gets SIGKILL a second later.
                    let cluster = self.cluster.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let _ = cluster.request(&node, Op::Signal { run: id, signal: libc::SIGKILL }, timeout).await;
                    });
                }
                Ok(())
            }
            _ => Err(FsError::invalid(format!("job {id} has ended ({})", job.state_line()))),
        }
    }

    /// `rmdir jobs/<id>`: kills it if running and removes it with its output.
    pub async fn remove(&self, id: u64) -> Result<(), FsError> {
        let job = self.get(id).ok_or_else(|| FsError::not_found(format!("job {id}")))?;
        if job.state == State::Running {
            if let Some(node) = &job.node {
                let timeout = Duration::from_millis(self.cluster.cfg.ping_timeout_ms);
                // The agent kills a run it is told to forget; a down node is told when it returns.
                let _ = self.cluster.request(node, Op::Forget { run: id }, timeout).await;
            }
        }
        self.cluster.store().delete("jobs", &id.to_string()).map_err(store_err)?;
        self.jobs.remove(&id);
        let _ = std::fs::remove_dir_all(self.spool.join(id.to_string()));
        self.changed.notify_waiters();
        info!(job = id, "job removed");
        Ok(())
    }

    /// Waits until job `id` ends; its final state.
    pub async fn wait(&self, id: u64) -> Result<Job, FsError> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let ended = self.with(id, |j| j.state.ended());
            match ended {
                None => return Err(FsError::not_found(format!("job {id} (removed while waited on)"))),
                Some(true) => return self.get(id).ok_or_else(|| FsError::not_found(format!("job {id}"))),
                Some(false) => {}
            }
            notified.await;
        }
    }
}
