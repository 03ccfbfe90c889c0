//! `jobs/`: `new` takes specs, `queue` lists what has not ended, `<id>/` shows and controls a job.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clusterfs_fs::{Answer, Caller, Errno, FsError, Kind, Node, Result};
use dashmap::DashMap;

use super::{ERROR_FILE, FileSpec, README_FILE, Verb, blocking, command_text, readme, spec_node};
use crate::head::jobs::{Job, Jobs, Owner, State};
use crate::jobs::spec::{KEYS, MAX_SPEC, Spec};
use crate::jobs::{STDERR, STDOUT};

const DIR_FILES: &[FileSpec] = &[
    README_FILE,
    FileSpec {
        name: "new",
        kind: Kind::Control,
        perm: 0o666,
        help: "write a job spec; read the same handle back for its id",
    },
    FileSpec {
        name: "queue",
        kind: Kind::Snapshot,
        perm: 0o444,
        help: "jobs not ended: `id user state node name` per line",
    },
    ERROR_FILE,
];

const JOB_FILES: &[FileSpec] = &[
    README_FILE,
    FileSpec { name: "spec", kind: Kind::Snapshot, perm: 0o400, help: "the spec as written (owner)" },
    FileSpec {
        name: "state",
        kind: Kind::Snapshot,
        perm: 0o444,
        help: "queued <why> | running on <node> | done <exit> | failed <exit> | killed by <user> | timeout ... | lost <why>",
    },
    FileSpec {
        name: "nodes",
        kind: Kind::Snapshot,
        perm: 0o444,
        help: "where it runs or ran, folded (a multi-node job: a directory, below)",
    },
    FileSpec {
        name: "exit",
        kind: Kind::Snapshot,
        perm: 0o444,
        help: "the exit status once ended (128+N when killed by signal N)",
    },
    FileSpec {
        name: "wait",
        kind: Kind::Blocking,
        perm: 0o444,
        help: "blocks until the job ends, then gives its exit status (EAGAIN under O_NONBLOCK)",
    },
    FileSpec { name: "stdout", kind: Kind::Log, perm: 0o400, help: "standard output, growing while it runs (owner)" },
    FileSpec { name: "stderr", kind: Kind::Log, perm: 0o400, help: "standard error, growing while it runs (owner)" },
    FileSpec { name: "ctl", kind: Kind::Control, perm: 0o600, help: "the owner or root writes a verb below" },
    FileSpec {
        name: "summary",
        kind: Kind::Snapshot,
        perm: 0o444,
        help: "`PASS: <nodes>, SUM: <n>`, then FAILED, TIMEOUT, DOWN lines when any",
    },
    FileSpec {
        name: "output",
        kind: Kind::Snapshot,
        perm: 0o400,
        help: "stdout gathered: nodes with the same output and exit under one header (owner)",
    },
    FileSpec {
        name: "progress",
        kind: Kind::Snapshot,
        perm: 0o444,
        help: "a copy job's bytes delivered per node: `<nodes> <bytes>/<size>`, furthest first",
    },
    ERROR_FILE,
];

/// The directories a multi-node job has besides its files.
const SPREAD_DIRS: &[FileSpec] = &[
    FileSpec {
        name: "nodes",
        kind: Kind::Dir,
        perm: 0o755,
        help: "nodes/<node>/: each node's state, exit, stdout, stderr",
    },
    FileSpec {
        name: "attempts",
        kind: Kind::Dir,
        perm: 0o755,
        help: "attempts/<n>/: summary, output and nodes/ of attempt n alone",
    },
];

/// The files of one node's run in a multi-node job.
const RUN_FILES: &[FileSpec] = &[
    FileSpec { name: "state", kind: Kind::Snapshot, perm: 0o444, help: "as a job's state" },
    FileSpec { name: "exit", kind: Kind::Snapshot, perm: 0o444, help: "the exit status once ended" },
    FileSpec { name: "stdout", kind: Kind::Log, perm: 0o400, help: "standard output (owner)" },
    FileSpec { name: "stderr", kind: Kind::Log, perm: 0o400, help: "standard error (owner)" },
];

/// The files of one attempt of a multi-node job (besides `nodes/`).
const ATTEMPT_FILES: &[&str] = &["summary", "output"];

pub const VERBS: &[Verb] = &[
    Verb { name: "kill", args: "", help: "SIGTERM, then SIGKILL a second later; a queued job never starts" },
    Verb {
        name: "signal",
        args: "<SIG>",
        help: "send a signal: TERM, KILL, INT, HUP, USR1, USR2, STOP, CONT (or its number)",
    },
    Verb {
        name: "retry-failed",
        args: "",
        help: "an ended multi-node job runs again on the nodes that did not pass, as a new attempt",
    },
];

/// What a path below `jobs/` names, besides a file in it.
enum At {
    /// A job's or an array task's directory.
    Job(Job),
    /// `tasks/` of an array job.
    Tasks(Job),
    /// `nodes/` of a multi-node job: each node's latest run, or those of one attempt.
    Nodes(Job, Option<usize>),
    /// `attempts/` of a multi-node job.
    Attempts(Job),
    /// `attempts/<n>/`, as attempt index n - 1.
    Attempt(Job, usize),
    /// `nodes/<node>/`: that node's run.
    Run(Job),
}

impl At {
    /// The job whose owner and times the directory takes.
    fn job(&self) -> &Job {
        match self {
            At::Job(j) | At::Tasks(j) | At::Nodes(j, _) | At::Attempts(j) | At::Attempt(j, _) | At::Run(j) => j,
        }
    }

    /// Whether `file` is a file of this directory.
    fn has(&self, file: &str) -> bool {
        match self {
            At::Job(job) => job_files(job).any(|f| f.name == file),
            At::Attempt(..) => ATTEMPT_FILES.contains(&file),
            At::Run(_) => RUN_FILES.iter().any(|f| f.name == file),
            At::Tasks(_) | At::Nodes(..) | At::Attempts(_) => false,
        }
    }
}

/// The files of a job's directory: `nodes` is a directory for a multi-node job; an array job
/// gathers nothing (its tasks do).
fn job_files(job: &Job) -> impl Iterator<Item = &'static FileSpec> + '_ {
    JOB_FILES.iter().filter(move |f| match f.name {
        "nodes" => job.spread.is_none(),
        "summary" | "output" => job.spec.array.is_none() || job.task.is_some(),
        "progress" => job.spec.copy.is_some() && job.task.is_none(),
        _ => true,
    })
}

/// A `jobs/new` handle still being written.
#[derive(Debug, Default)]
struct Pending {
    id: Option<u64>,
    text: Vec<u8>,
    /// Bumped on each write; the quiet-time release checks it has not moved.
    writes: u64,
    /// Why a piece was refused: the rest of this spec is refused the same way.
    failed: Option<FsError>,
    /// The store ticket of the spec's last write: flush and reading the id back wait for it.
    ticket: Option<u64>,
}

/// The pieces of one handle's spec, put together in offset order: the kernel may send
/// several writes of one large write(2) at once.
#[derive(Debug, Default)]
struct Slot {
    pending: tokio::sync::Mutex<Pending>,
    moved: tokio::sync::Notify,
}

/// How long a piece waits for the pieces before it.
const PIECE_WAIT: Duration = Duration::from_secs(10);

/// The `jobs/` part of the tree.
#[derive(Debug)]
pub struct JobsView {
    jobs: Arc<Jobs>,
    pending: Arc<DashMap<u64, Arc<Slot>>>,
    /// Files created in `jobs/` while a spec is written into them: a client that can only
    /// create new files (`nfs-cp`) submits through one. Owner and mode, by name.
    spec_files: DashMap<String, SpecFile>,
}

/// A spec file created in `jobs/`: its owner, mode and when it was made.
#[derive(Debug)]
struct SpecFile {
    uid: u32,
    gid: u32,
    perm: u16,
    made: std::time::Instant,
}

/// A created spec file nobody wrote into goes after this long.
const SPEC_FILE_KEPT: Duration = Duration::from_secs(600);

/// A spec file's mode from the one asked for: read and write bits, always the owner's.
fn spec_file_perm(mode: u32) -> u16 {
    (mode & 0o666) as u16 | 0o600
}

fn parse_id(s: &str) -> Option<u64> {
    s.parse().ok().filter(|_| !s.starts_with('0') && !s.starts_with('+'))
}

fn owned(node: Node, job: &Job) -> Node {
    let t = SystemTime::UNIX_EPOCH + Duration::from_millis(job.ended_ms.or(job.started_ms).unwrap_or(job.submitted_ms));
    node.owned(job.owner.uid, job.owner.gid).mtime(t)
}

/// What `jobs/new` (or a created spec file) reads before a write: nothing. The job's id comes
/// back on the handle that wrote its spec.
pub const SPEC_FILE_READS: &[u8] = b"";

/// `jobs/new`'s attributes, the same on every head at every moment.
pub fn new_node() -> Option<Node> {
    spec_node(DIR_FILES, "new")
}

impl JobsView {
    pub fn new(jobs: Arc<Jobs>) -> JobsView {
        JobsView { jobs, pending: Arc::default(), spec_files: DashMap::new() }
    }

    /// Whether `path` takes a spec: `new`, or a file created to write one.
    fn takes_spec(&self, path: &[&str]) -> bool {
        match path {
            ["new"] => true,
            [name] => self.spec_files.contains_key(*name),
            _ => false,
        }
    }

    /// A file created in `jobs/` (`nfs-cp spec nfs://head/cluster/jobs/<name>`: nfs-cp never
    /// writes over an existing file): a `jobs/new` of its own until its writer closes it.
    pub fn create_file(&self, path: &[&str], caller: &Caller, mode: u32) -> Answer<()> {
        // Files created and never written (an interrupted client) do not stay.
        self.spec_files.retain(|_, d| d.made.elapsed() < SPEC_FILE_KEPT);
        let made = match path {
            [name] if parse_id(name).is_some() => {
                Err(FsError::new(Errno::Perm, format!("{name}: numbers name jobs, and clusterfs makes those")))
            }
            [name] if spec_node(DIR_FILES, name).is_some() => {
                Err(FsError::new(Errno::Exist, format!("jobs/{name} exists")))
            }
            [name] => crate::names::check("spec file", name).map_err(FsError::invalid).and_then(|()| {
                match self.spec_files.entry(name.to_string()) {
                    dashmap::Entry::Occupied(_) => {
                        Err(FsError::new(Errno::Exist, format!("jobs/{name} is being written")))
                    }
                    dashmap::Entry::Vacant(v) => {
                        let perm = spec_file_perm(mode);
                        v.insert(SpecFile { uid: caller.uid, gid: caller.gid, perm, made: std::time::Instant::now() });
                        Ok(())
                    }
                }
            }),
            _ => Err(FsError::new(Errno::Perm, "files cannot be made here")),
        };
        Answer::Now(made)
    }

    /// Its creator may set a created spec file's mode (read and write bits only).
    pub fn chmod(&self, path: &[&str], caller: &Caller, mode: u32) -> Result<()> {
        let denied = FsError::fixed_modes;
        let [name] = path else { return Err(denied()) };
        let mut file = self.spec_files.get_mut(*name).ok_or_else(denied)?;
        if file.uid != caller.uid && !caller.is_root() {
            return Err(denied());
        }
        file.perm = spec_file_perm(mode);
        Ok(())
    }

    fn job(&self, id: &str) -> Result<Job> {
        parse_id(id).and_then(|n| self.jobs.job(n)).ok_or_else(|| FsError::not_found(format!("job {id}")))
    }

    /// What a path below `jobs/` names: a directory, and the file in it if the path goes on
    /// to one (checked to exist).
    fn resolve<'p>(&self, path: &'p [&'p str]) -> Result<(At, Option<&'p str>)> {
        let missing = || FsError::not_found(format!("jobs/{}", path.join("/")));
        let [id, rest @ ..] = path else { return Err(FsError::invalid("not a job")) };
        let job = self.job(id)?;
        let (array, spread) = (job.spec.array.is_some(), job.spread.is_some());
        let attempt = |n: &str| {
            let k = parse_id(n).and_then(|n| usize::try_from(n).ok())?.checked_sub(1)?;
            (k < job.spread.as_ref()?.attempts.len()).then_some(k)
        };
        let (at, rest) = match rest {
            ["tasks"] if array => (At::Tasks(job), &[][..]),
            ["tasks", n, rest @ ..] if array => {
                let index = parse_id(n).or((*n == "0").then_some(0)).and_then(|i| u32::try_from(i).ok());
                let task = index.and_then(|i| self.jobs.task(job.id, i)).ok_or_else(missing)?;
                (At::Job(task), rest)
            }
            ["nodes", rest @ ..] if spread => self.in_nodes(job, None, rest, &missing)?,
            ["attempts"] if spread => (At::Attempts(job), &[][..]),
            ["attempts", n, rest @ ..] if spread => {
                let k = attempt(n).ok_or_else(missing)?;
                match rest {
                    ["nodes", rest @ ..] => self.in_nodes(job, Some(k), rest, &missing)?,
                    rest => (At::Attempt(job, k), rest),
                }
            }
            rest => (At::Job(job), rest),
        };
        match rest {
            [] => Ok((at, None)),
            [file] if at.has(file) => Ok((at, Some(*file))),
            _ => Err(missing()),
        }
    }

    /// Below `nodes/` of a multi-node job (or of one attempt of it).
    fn in_nodes<'p>(
        &self,
        job: Job,
        attempt: Option<usize>,
        rest: &'p [&'p str],
        missing: &dyn Fn() -> FsError,
    ) -> Result<(At, &'p [&'p str])> {
        match rest {
            [] => Ok((At::Nodes(job, attempt), rest)),
            [node, rest @ ..] => {
                let run = self.jobs.node_run(&job, attempt, node).ok_or_else(missing)?;
                Ok((At::Run(run), rest))
            }
        }
    }

    /// The directory and the file a path names (a directory itself is EISDIR).
    fn file<'p>(&self, path: &'p [&'p str]) -> Result<(At, &'p str)> {
        match self.resolve(path)? {
            (at, Some(file)) => Ok((at, file)),
            (_, None) => Err(FsError::new(Errno::IsDir, "a directory")),
        }
    }

    pub fn node(&self, path: &[&str]) -> Result<Node> {
        match path {
            [] => Ok(Node::new(Kind::Dir, 0o1777)),
            [name] if parse_id(name).is_none() => spec_node(DIR_FILES, name)
                .or_else(|| self.spec_files.get(*name).map(|d| Node::new(Kind::Control, d.perm).owned(d.uid, d.gid)))
                .ok_or_else(|| FsError::not_found(format!("jobs/{name}"))),
            _ => {
                let (at, file) = self.resolve(path)?;
                let job = at.job();
                let Some(file) = file else { return Ok(owned(Node::new(Kind::Dir, 0o755), job)) };
                let node = spec_node(JOB_FILES, file)
                    .or_else(|| spec_node(RUN_FILES, file))
                    .ok_or_else(|| FsError::not_found(format!("jobs/{}", path.join("/"))))?;
                Ok(match file {
                    "stdout" => owned(node, job).size(self.jobs.output_len(job.id, STDOUT)).mtime(SystemTime::now()),
                    "stderr" => owned(node, job).size(self.jobs.output_len(job.id, STDERR)).mtime(SystemTime::now()),
                    _ => owned(node, job),
                })
            }
        }
    }

    pub fn list(&self, path: &[&str]) -> Result<Vec<String>> {
        if path.is_empty() {
            return Ok(DIR_FILES
                .iter()
                .map(|f| f.name.to_string())
                .chain(self.jobs.ids().iter().map(u64::to_string))
                .chain(self.spec_files.iter().map(|d| d.key().clone()))
                .collect());
        }
        let names = |files: &mut dyn Iterator<Item = &str>| files.map(str::to_string).collect();
        Ok(match self.resolve(path)? {
            (_, Some(_)) => return Err(FsError::new(Errno::NotDir, "not a directory")),
            (At::Job(job), None) => {
                let dirs: &[&str] = match (&job.spec.array, &job.spread) {
                    (Some(_), _) if job.task.is_none() => &["tasks"],
                    (_, Some(_)) => &["nodes", "attempts"],
                    _ => &[],
                };
                names(&mut job_files(&job).map(|f| f.name).chain(dirs.iter().copied()))
            }
            (At::Tasks(job), None) => {
                job.spec.array.as_ref().map_or_else(Vec::new, |a| a.indexes.iter().map(u32::to_string).collect())
            }
            (At::Nodes(job, attempt), None) => job.spread.as_ref().map_or_else(Vec::new, |s| s.names(attempt)),
            (At::Attempts(job), None) => {
                (1..=job.spread.as_ref().map_or(0, |s| s.attempts.len())).map(|n| n.to_string()).collect()
            }
            (At::Attempt(..), None) => names(&mut ATTEMPT_FILES.iter().copied().chain(["nodes"])),
            (At::Run(_), None) => names(&mut RUN_FILES.iter().map(|f| f.name)),
        })
    }

    pub fn render(&self, path: &[&str], caller: &Caller, nonblock: bool) -> Answer<Vec<u8>> {
        let now = |r: Result<String>| Answer::Now(r.map(String::into_bytes));
        match path {
            ["README"] => {
                Answer::Now(Ok(readme("jobs/: submit, watch, wait for and control jobs", DIR_FILES, &[], &spec_help())))
            }
            _ if self.takes_spec(path) => Answer::Now(Ok(SPEC_FILE_READS.to_vec())),
            ["queue"] => now(Ok(self.jobs.queue())),
            _ => {
                let (at, file) = match self.file(path) {
                    Ok(x) => x,
                    Err(e) => return Answer::Now(Err(e)),
                };
                let id = path[..path.len() - 1].join("/");
                match (at, file) {
                    (At::Attempt(job, k), "summary") => now(Ok(self.jobs.summary(&job, Some(k)))),
                    (At::Attempt(job, k), "output") => self.gathered(job, Some(k), caller),
                    (At::Run(run) | At::Job(run), "state") => now(Ok(format!("{}\n", run.state_line()))),
                    (At::Run(run) | At::Job(run), "exit") => {
                        now(Ok(run.exit.as_ref().map_or(String::new(), |e| format!("{}\n", e.code))))
                    }
                    (At::Job(job), file) => self.render_job(job, &id, file, caller, nonblock),
                    (_, file) => Answer::Now(Err(FsError::not_found(format!("jobs/{id}/{file}")))),
                }
            }
        }
    }

    /// A file of a job's (or an array task's) own directory.
    fn render_job(&self, job: Job, id: &str, file: &str, caller: &Caller, nonblock: bool) -> Answer<Vec<u8>> {
        let now = |r: Result<String>| Answer::Now(r.map(String::into_bytes));
        match file {
            "README" => {
                let help = match (&job.spec.array, &job.spread) {
                    (Some(_), _) if job.task.is_none() => ARRAY_HELP,
                    (_, Some(_)) => SPREAD_HELP,
                    _ => "",
                };
                let what = if job.task.is_some() { "array task" } else { "job" };
                let files: Vec<&FileSpec> =
                    job_files(&job).chain(job.spread.iter().flat_map(|_| SPREAD_DIRS)).collect();
                Answer::Now(Ok(readme(&format!("jobs/{id}: one {what}"), files, &[("ctl", VERBS)], help)))
            }
            "spec" => now(owner_only(&job, caller).map(|()| match job.task {
                Some(t) => self.jobs.with(t.parent, |p| p.text.to_string()).unwrap_or_default(),
                None => job.text.to_string(),
            })),
            "nodes" => now(Ok(format!("{}\n", self.jobs.nodes_of(&job)))),
            "summary" => now(Ok(self.jobs.summary(&job, None))),
            "progress" => now(Ok(self.jobs.progress_text(&job))),
            "output" => self.gathered(job, None, caller),
            "ctl" => {
                now(Ok(VERBS.iter().map(|v| format!("{} {}", v.name, v.args).trim_end().to_string() + "\n").collect()))
            }
            "wait" if job.state.ended() => now(Ok(wait_line(&job))),
            "wait" if nonblock => Answer::Now(Err(FsError::new(Errno::Again, format!("job {id} has not ended")))),
            "wait" => {
                let jobs = self.jobs.clone();
                Answer::later(async move {
                    let ended = match job.task {
                        Some(t) => jobs.wait_task(t.parent, t.index).await,
                        None => jobs.wait(job.id).await,
                    };
                    ended.map(|j| wait_line(&j).into_bytes())
                })
            }
            _ => Answer::Now(Err(FsError::not_found(format!("jobs/{id}/{file}")))),
        }
    }

    /// `output`: the owner's, read from the spools off the FUSE threads.
    fn gathered(&self, job: Job, attempt: Option<usize>, caller: &Caller) -> Answer<Vec<u8>> {
        if let Err(e) = owner_only(&job, caller) {
            return Answer::Now(Err(e));
        }
        let jobs = self.jobs.clone();
        blocking(move || {
            jobs.gathered(&job, attempt)
                .map(String::into_bytes)
                .map_err(|e| FsError::new(Errno::Io, format!("reading the spool: {e}")))
        })
    }

    pub fn read_log(&self, path: &[&str], caller: &Caller, offset: u64, size: u32) -> Result<Vec<u8>> {
        let (At::Job(job) | At::Run(job), file @ ("stdout" | "stderr")) = self.file(path)? else {
            return Err(FsError::invalid("not a log file"));
        };
        owner_only(&job, caller)?;
        let stream = if file == "stdout" { STDOUT } else { STDERR };
        self.jobs
            .read_output(job.id, stream, offset, size as usize)
            .map_err(|e| FsError::new(Errno::Io, format!("reading the spool: {e}")))
    }

    pub fn write(&self, path: &[&str], caller: &Caller, handle: u64, offset: u64, data: &[u8]) -> Answer<Vec<u8>> {
        match path {
            _ if self.takes_spec(path) => self.write_new(caller, handle, offset, data),
            [_, .., "ctl"] => {
                let job = match self.file(path) {
                    Ok((At::Job(job), _)) => job,
                    Ok(_) => return Answer::Now(Err(FsError::denied("this file is read-only"))),
                    Err(e) => return Answer::Now(Err(e)),
                };
                if let Err(e) = owner_only(&job, caller) {
                    return Answer::Now(Err(e));
                }
                let text = match command_text(data, 256) {
                    Ok(t) => t.to_string(),
                    Err(e) => return Answer::Now(Err(with_usage(e))),
                };
                let signal = match text.split_whitespace().collect::<Vec<_>>().as_slice() {
                    ["retry-failed"] => {
                        let (jobs, id) = (self.jobs.clone(), job.id);
                        return blocking(move || jobs.retry_failed(id).map(|_| Vec::new()));
                    }
                    ["kill"] => libc::SIGTERM,
                    ["signal", sig] => match parse_signal(sig) {
                        Some(s) => s,
                        None => {
                            return Answer::Now(Err(with_usage(FsError::invalid(format!("unknown signal {sig:?}")))));
                        }
                    },
                    _ => return Answer::Now(Err(with_usage(FsError::invalid(format!("unknown command {text:?}"))))),
                };
                let (jobs, who, id, task) = (self.jobs.clone(), user_name(caller.uid), job.id, job.task);
                Answer::later(async move {
                    match task {
                        Some(t) => jobs.signal_task(t.parent, t.index, signal, &who).await,
                        None => jobs.signal(id, signal, &who).await,
                    }
                    .map(|()| Vec::new())
                })
            }
            _ => Answer::Now(Err(FsError::denied("this file is read-only"))),
        }
    }

    /// `jobs/new`: the first write of a handle creates the job (held) and answers its id;
    /// later writes on that handle extend the spec. A first write of nothing but blanks (an
    /// `echo "$CMD"` whose variable is empty) is refused: it can start no spec.
    fn write_new(&self, caller: &Caller, handle: u64, offset: u64, data: &[u8]) -> Answer<Vec<u8>> {
        if offset == 0 && !data.is_empty() && data.iter().all(u8::is_ascii_whitespace) {
            return Answer::Now(Err(FsError::invalid(
                "the spec is empty: write a shell line, #CLUSTER lines then a script, or a JSON object; nothing was submitted",
            )));
        }
        let slot = self.pending.entry(handle).or_default().clone();
        let (jobs, pending, caller, data) = (self.jobs.clone(), self.pending.clone(), *caller, data.to_vec());
        let release_after = Duration::from_millis(self.jobs.cfg.release_after_ms);
        Answer::later(async move {
            let mut p = loop {
                let moved = slot.moved.notified();
                let p = slot.pending.lock().await;
                if let Some(e) = &p.failed {
                    return Err(e.clone());
                }
                if p.text.len() as u64 >= offset {
                    break p;
                }
                drop(p);
                tokio::time::timeout(PIECE_WAIT, moved)
                    .await
                    .map_err(|_| FsError::new(Errno::Io, "a piece of the spec before this one never came"))?;
            };
            // A piece that overlaps what is there (a retried write) adds only what is new.
            let skip = usize::try_from(p.text.len() as u64 - offset).unwrap_or(usize::MAX).min(data.len());
            let mut text = p.text.clone();
            text.extend_from_slice(&data[skip..]);
            let checked = if text.len() > MAX_SPEC {
                Err(FsError::new(Errno::FBig, format!("a job spec is at most {MAX_SPEC} bytes; nothing was submitted")))
            } else {
                // Only a write that filled a writer's buffer can have cut a line or a JSON text short.
                Spec::parse_prefix(&text, data.len() >= 4096).map_err(|e| FsError::invalid(e.0))
            };
            // In memory now, in the store by the next commit (flush waits for it).
            let stored = checked.and_then(|spec| {
                let body = String::from_utf8_lossy(&text).into_owned();
                match p.id {
                    None => jobs.submit(owner_of(&caller), body, spec, true),
                    Some(id) => jobs.amend(id, body, spec, false).map(|t| (id, t)),
                }
            });
            let first = p.id.is_none();
            let id = match stored {
                Ok((id, ticket)) => {
                    // Tickets grow: the last piece's covers the earlier pieces' writes.
                    p.ticket = p.ticket.max(Some(ticket));
                    id
                }
                Err(e) => {
                    p.failed = Some(e.clone());
                    if let Some(id) = p.id {
                        let _ = jobs.remove(id).await;
                    }
                    slot.moved.notify_waiters();
                    return Err(e);
                }
            };
            p.id = Some(id);
            p.text = text;
            p.writes += 1;
            let seq = p.writes;
            drop(p);
            slot.moved.notify_waiters();
            // A writer that never closes (NFS) has finished once it stays quiet.
            tokio::spawn(async move {
                tokio::time::sleep(release_after).await;
                let quiet = slot.pending.lock().await.writes == seq;
                if quiet && pending.remove_if(&handle, |_, s| Arc::ptr_eq(s, &slot)).is_some() {
                    finish(&jobs, &*slot.pending.lock().await);
                }
            });
            Ok(if first { format!("{id}\n").into_bytes() } else { Vec::new() })
        })
    }

    /// Before `close(2)` returns or the id is read back, the submitted job is in the store.
    pub fn flush(&self, path: &[&str], handle: u64) -> Answer<()> {
        let Some(slot) = self.pending.get(&handle).filter(|_| self.takes_spec(path)).map(|s| s.clone()) else {
            return Answer::Now(Ok(()));
        };
        let jobs = self.jobs.clone();
        Answer::later(async move {
            let (ticket, id) = {
                let p = slot.pending.lock().await;
                (p.ticket, p.id)
            };
            let Some(ticket) = ticket else { return Ok(()) };
            let j = jobs.clone();
            let stored = tokio::task::spawn_blocking(move || j.durable(ticket))
                .await
                .unwrap_or_else(|e| Err(FsError::new(Errno::Io, format!("internal error: {e}"))));
            if let (Err(e), Some(id)) = (&stored, id) {
                // Never run what was not stored: the writer is told, the job says why.
                slot.pending.lock().await.failed = Some(e.clone());
                jobs.fail(id, &format!("not run: its record could not be stored ({})", e.message));
            }
            stored
        })
    }

    /// The writer of a `jobs/new` handle (or of a created spec file) closed it.
    pub fn release(&self, path: &[&str], handle: u64) {
        if self.takes_spec(path)
            && let Some((_, slot)) = self.pending.remove(&handle)
        {
            let jobs = self.jobs.clone();
            tokio::spawn(async move { finish(&jobs, &*slot.pending.lock().await) });
            // A created spec file goes with the handle that wrote it (an NFS server opens and
            // closes others around its creation).
            if let [name] = path {
                self.spec_files.remove(*name);
            }
        }
    }

    pub fn rmdir(&self, path: &[&str], caller: &Caller) -> Answer<()> {
        let [id] = path else {
            let why = match path {
                [_, "tasks", ..] => "array tasks are removed with their job: rmdir jobs/<id>",
                _ => "this directory cannot be removed",
            };
            return Answer::Now(Err(FsError::new(Errno::Perm, why)));
        };
        let job = match self.job(id) {
            Ok(j) => j,
            Err(e) => return Answer::Now(Err(e)),
        };
        if let Err(e) = owner_only(&job, caller) {
            return Answer::Now(Err(e));
        }
        let jobs = self.jobs.clone();
        Answer::later(async move { jobs.remove(job.id).await })
    }

    /// Ids of jobs running on `node`, one per line (an array job's tasks as `<id>/tasks/<n>`, a
    /// multi-node job as its id).
    pub fn on_node(&self, node: &str) -> String {
        self.jobs
            .scan(|j| {
                (j.state == State::Running && j.node.as_deref() == Some(node)).then(|| match j.task {
                    Some(t) if t.attempt.is_some() => format!("{}\n", t.parent),
                    Some(t) => format!("{}/tasks/{}\n", t.parent, t.index),
                    None => format!("{}\n", j.id),
                })
            })
            .concat()
    }

    /// The `jobs ...` line of `/cluster/status`.
    pub fn status(&self) -> String {
        let states = self.jobs.scan(|j| j.task.is_none().then_some(j.state));
        let count = |f: fn(&State) -> bool| states.iter().filter(|s| f(s)).count();
        format!(
            "jobs queued={} running={} ended={}\n",
            count(|s| *s == State::Queued),
            count(|s| *s == State::Running),
            count(|s| s.ended())
        )
    }
}

const ARRAY_HELP: &str = "An array job runs its script once per index, as tasks/<n>/ (same files; the\n\
task's CLUSTER_ARRAY_INDEX is n), in index order, at most the `%` limit at once. This\n\
directory's stdout and stderr stay empty: each task has its own. The job ends when its last\n\
task has: done if every task was done, else failed with the highest exit status, naming the\n\
tasks that were not. kill stops the running tasks and starts no more.\n";

const SPREAD_HELP: &str = "A multi-node job runs its script on each of its nodes at once (CLUSTER_NODE is the\n\
node, CLUSTER_NODES all of them). nodes/<node>/ has each node's state, exit, stdout and\n\
stderr; summary sorts the nodes as PASS, FAILED, TIMEOUT (its timeout, per node) and DOWN (down\n\
or lost); output gathers the nodes' stdout. A down or drained node fails at once. The job's\n\
exit status is the largest of its nodes' (255 for a node that never ran it); its own stdout and\n\
stderr stay empty. retry-failed reruns the nodes that did not pass as a new attempt:\n\
attempts/<n>/ keeps each attempt's summary, output and nodes/, while this directory shows each\n\
node's latest run.\n";

/// The final parse at release: a spec that turned out broken fails the job with the reason.
fn finish(jobs: &Arc<Jobs>, p: &Pending) {
    let Some(id) = p.id.filter(|_| p.failed.is_none()) else { return };
    match Spec::parse(&p.text) {
        Ok(spec) => {
            let body = String::from_utf8_lossy(&p.text).into_owned();
            match jobs.amend(id, body, spec, true) {
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(job = id, error = %e, "the complete spec was refused");
                    jobs.fail(id, &format!("spec: {}", e.message));
                }
            }
        }
        Err(e) => {
            tracing::debug!(job = id, error = %e, "the spec was incomplete when its writer stopped");
            jobs.fail(id, &format!("spec: {e}"));
        }
    }
    jobs.release(id);
}

fn wait_line(job: &Job) -> String {
    match &job.exit {
        Some(e) => format!("{}\n", e.code),
        None => format!("{}\n", job.state_line()),
    }
}

fn owner_only(job: &Job, caller: &Caller) -> Result<()> {
    if caller.is_root() || caller.uid == job.owner.uid {
        Ok(())
    } else {
        Err(FsError::denied(format!("job {} belongs to {}", job.id, job.owner.user)))
    }
}

fn with_usage(e: FsError) -> FsError {
    FsError::new(e.errno, format!("{}; jobs/<id>/ctl takes: kill | signal <SIG> | retry-failed", e.message))
}

fn parse_signal(s: &str) -> Option<i32> {
    let name = s.strip_prefix("SIG").unwrap_or(s);
    let sig = match name {
        "TERM" => libc::SIGTERM,
        "KILL" => libc::SIGKILL,
        "INT" => libc::SIGINT,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "QUIT" => libc::SIGQUIT,
        n => n.parse().ok().filter(|n| (1..=64).contains(n))?,
    };
    Some(sig)
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(uid.into()).ok().flatten().map_or_else(|| uid.to_string(), |u| u.name)
}

/// The submitter: uid and gid of the request, with the caller's groups.
fn owner_of(caller: &Caller) -> Owner {
    Owner { uid: caller.uid, gid: caller.gid, groups: super::caller_groups(caller), user: user_name(caller.uid) }
}

fn spec_help() -> String {
    let mut s = String::from(
        "A spec is one shell line, or `#CLUSTER key=value ...` lines then a script, or one JSON\n\
         object (with \"cmd\"). The job runs as you, on the best node that fits.\n\
         \n  exec 3<>/cluster/jobs/new; echo 'make -j4' >&3; read id <&3; cat /cluster/jobs/$id/wait\n\nkeys:\n",
    );
    for (k, help) in KEYS {
        s.push_str(&format!("  {k:<10} {help}\n"));
    }
    s
}
