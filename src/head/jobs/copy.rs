//! Copy jobs on the head: the file's facts, the relay tree, feeding its top, progress, and routing around nodes that drop out.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clusterfs_fs::FsError;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Jobs, Owner, State, now_ms};
use crate::head::cluster::NodeState;
use crate::jobs::Spec;
use crate::jobs::copy::{self, Branch, CHUNK, FileFacts, FileSum, Plan};
use crate::nodeset::NodeSet;
use crate::proto::{Frame, ProtoError};

/// The relay tree's width when the spec gives none.
const DEFAULT_FANOUT: u32 = 8;

/// How long a node may go without reports, still connected, before the copy routes around it.
const GONE_AFTER: Duration = Duration::from_secs(10);

/// How long a node's agent has to accept its copy run before the tree is built without it.
const CONFIRM_WAIT: Duration = Duration::from_secs(10);

/// Whether `owner` may read `meta`'s file, by its mode bits (root may read anything).
fn may_read(owner: &Owner, meta: &std::fs::Metadata) -> bool {
    let mode = meta.mode();
    owner.uid == 0
        || (meta.uid() == owner.uid && mode & 0o400 != 0)
        || ((meta.gid() == owner.gid || owner.groups.contains(&meta.gid())) && mode & 0o040 != 0)
        || mode & 0o004 != 0
}

/// Whether `owner` may send the file `meta` describes: a regular file it may read and, for
/// anyone but root, owns (its owner is kept on the nodes).
fn may_send(owner: &Owner, src: &str, meta: &std::fs::Metadata) -> Result<(), FsError> {
    if !meta.is_file() {
        return Err(FsError::invalid(format!("copy={src}: not a regular file")));
    }
    if !may_read(owner, meta) {
        return Err(FsError::denied(format!("copy={src}: {} may not read it", owner.user)));
    }
    if owner.uid != 0 && meta.uid() != owner.uid {
        return Err(FsError::denied(format!(
            "copy={src}: only root may copy a file someone else owns (its owner is kept)"
        )));
    }
    Ok(())
}

/// Opens a copy's source once, when the copy starts, checks the file that was opened (not the
/// path: it may have become a symlink to another file since the submission was checked), and
/// reads its size, mode, owner, mtime and checksum. Every feed reads this open file.
fn open_source(owner: &Owner, src: &str) -> Result<(Arc<std::fs::File>, FileFacts), String> {
    use std::io::Read;
    let unreadable = |e: std::io::Error| format!("cannot read {src}: {e}");
    // Not blocking: a path turned into a FIFO must not hold the open (its check comes after).
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(src)
        .map_err(unreadable)?;
    let meta = f.metadata().map_err(unreadable)?;
    may_send(owner, src, &meta).map_err(|e| format!("{e} (checked again when the copy started)"))?;
    let mut sum = FileSum::default();
    let mut buf = Vec::with_capacity(CHUNK);
    let mut size = 0u64;
    loop {
        // Whole chunks, as the feeds send them: a short read is not a chunk's end.
        buf.clear();
        let n = (&mut f).take(CHUNK as u64).read_to_end(&mut buf).map_err(unreadable)?;
        if n == 0 {
            break;
        }
        sum.add_chunk(copy::chunk_sum(&buf));
        size += n as u64;
    }
    if size != meta.len() {
        return Err(format!("cannot read {src}: it changed while it was read"));
    }
    let facts = FileFacts {
        size,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_s: meta.mtime(),
        mtime_ns: meta.mtime_nsec(),
        sum: sum.hex(),
    };
    Ok((Arc::new(f), facts))
}

/// Every branch of `tree`, by run.
fn by_run(tree: &[Branch], out: &mut HashMap<u64, Branch>) {
    for b in tree {
        out.insert(b.run, b.clone());
        by_run(&b.children, out);
    }
}

impl Jobs {
    /// A copy job's source, checked at submission (and again on the file opened when the copy
    /// starts): see [`may_send`].
    pub(super) fn check_copy(owner: &Owner, spec: &Spec) -> Result<(), FsError> {
        let Some(c) = &spec.copy else { return Ok(()) };
        let meta = std::fs::metadata(&c.src).map_err(|e| FsError::invalid(format!("copy={}: {e}", c.src)))?;
        may_send(owner, &c.src, &meta)
    }

    /// Bytes of copy run `run` written on its node so far, from the agent.
    pub fn progress(&self, node: &str, run: u64, bytes: u64) {
        if self.runs_on(run, node) {
            self.copied.insert(run, bytes);
            self.changed.notify_waiters();
        }
    }

    /// `progress` of a copy job: bytes delivered per node, nodes with equal progress folded
    /// together, the furthest first: `cn[0-3] 1048576/4194304`.
    pub fn progress_text(&self, job: &super::Job) -> String {
        let (Some(spread), Some(size)) = (&job.spread, job.copy_size) else { return String::new() };
        let mut groups: Vec<(u64, NodeSet)> = Vec::new();
        for (node, run) in self.spread_runs(spread, None) {
            let bytes = match &run {
                Some(r) if r.state == State::Done => size,
                Some(r) => self.copied.get(&r.id).map_or(0, |b| *b),
                None => 0,
            };
            match groups.iter_mut().find(|g| g.0 == bytes) {
                Some(g) => drop(g.1.insert(&node)),
                None => {
                    let mut set = NodeSet::new();
                    let _ = set.insert(&node);
                    groups.push((bytes, set));
                }
            }
        }
        groups.sort_by_key(|g| std::cmp::Reverse(g.0));
        groups.iter().map(|(bytes, set)| format!("{} {bytes}/{size}\n", set.fold())).collect()
    }

    /// Ends copy run `run` from the head (it never got or lost its feed), unless it ended. Not
    /// waited for on the disk (this runs in a task): a head that stops first feeds it again.
    fn end_copy_run(&self, run: u64, state: State, reason: String) {
        let _ = self.update_later(run, |j| {
            if !j.state.ended() {
                j.state = state;
                j.reason = reason;
                j.ended_ms = Some(now_ms());
            }
        });
    }

    /// After a head restart: feeds again the copy jobs that were running (their nodes skip
    /// what they already have).
    pub fn resume_copies(self: &Arc<Self>) {
        for (id, spread) in
            self.scan(|j| (j.state == State::Running && j.spec.copy.is_some()).then(|| (j.id, j.spread.clone())))
        {
            let Some(spread) = spread else { continue };
            let runs: Vec<(String, u64)> = self
                .spread_runs(&spread, spread.attempts.len().checked_sub(1))
                .into_iter()
                .filter_map(|(node, run)| Some((node, run.filter(|r| r.state == State::Running)?.id)))
                .collect();
            info!(job = id, nodes = runs.len(), "resuming a copy");
            self.drive_copy(id, runs);
        }
    }

    /// Sends copy job `id`'s file to the nodes of `runs` (node, run) down a relay tree, from a
    /// task: the head feeds the top of the tree; a node that drops out (down, or its feed
    /// fails) is reported lost and the head feeds its children itself, from the start.
    pub(super) fn drive_copy(self: &Arc<Self>, id: u64, runs: Vec<(String, u64)>) {
        let Some((src, dest, fanout, owner)) =
            self.with(id, |j| j.spec.copy.clone().map(|c| (c.src, c.dest, j.spec.fanout, j.owner.clone()))).flatten()
        else {
            return;
        };
        let fanout = if fanout == 0 { DEFAULT_FANOUT } else { fanout } as usize;
        let this = self.clone();
        tokio::spawn(async move {
            let read = src.clone();
            let opened = tokio::task::spawn_blocking(move || open_source(&owner, &read)).await;
            let (file, facts) = match opened.map_err(|e| e.to_string()).and_then(|o| o) {
                Ok(o) => o,
                Err(why) => {
                    for (_, run) in runs {
                        this.end_copy_run(run, State::Failed, why.clone());
                    }
                    return;
                }
            };
            // Not waited for: a restarted head reads the file again.
            let _ = this.update_later(id, |j| j.copy_size = Some(facts.size));
            // The nodes' agents accept their runs first (a relay connection names its run), and
            // are connected (after a head restart they come back within moments).
            let deadline = Instant::now() + CONFIRM_WAIT;
            let ready = |node: &str, run: u64| {
                this.with(run, |j| j.state.ended() || (j.confirmed && this.cluster.relay(node).is_some()))
                    .unwrap_or(true)
            };
            while Instant::now() < deadline && !runs.iter().all(|(node, r)| ready(node, *r)) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut leaves = Vec::new();
            for (node, run) in runs {
                if this.with(run, |j| j.state.ended()).unwrap_or(true) {
                    continue;
                }
                match this.cluster.relay(&node) {
                    Some(addr) => leaves.push((node.clone(), run, addr, dest.replace("%n", &node))),
                    None => this.end_copy_run(run, State::Lost, format!("{node}'s agent takes no relay connections")),
                }
            }
            let top = copy::tree(leaves, fanout);
            let mut branches = HashMap::new();
            by_run(&top, &mut branches);
            info!(job = id, nodes = branches.len(), fanout, size = facts.size, "copy started");
            let (failed, mut failures) = mpsc::unbounded_channel::<(u64, String)>();
            for b in top {
                this.feed(facts.clone(), file.clone(), b, failed.clone());
            }
            let mut dropped: HashSet<u64> = HashSet::new();
            loop {
                // A killed copy is ended by its nodes; nothing is routed around any more.
                if this.with(id, |j| j.killed_by.is_some() || j.state.ended()).unwrap_or(true) {
                    break;
                }
                let open: Vec<&Branch> =
                    branches.values().filter(|b| !this.with(b.run, |j| j.state.ended()).unwrap_or(true)).collect();
                if open.is_empty() {
                    break;
                }
                let mut lost: Vec<(u64, String)> = Vec::new();
                while let Ok(f) = failures.try_recv() {
                    lost.push(f);
                }
                for b in open {
                    // Gone: its agent's connection closed, or no report for a while (a node
                    // busy relaying may report late; that alone is not dropping out).
                    let Some(v) = this.cluster.view(&b.node) else { continue };
                    let gone = this.cluster.relay(&b.node).is_none() || v.age_s >= GONE_AFTER.as_secs_f64();
                    if matches!(v.state, NodeState::Down(_)) && gone {
                        lost.push((b.run, v.state.line()));
                    }
                }
                for (run, why) in lost {
                    if !dropped.insert(run) {
                        continue;
                    }
                    let Some(b) = branches.get(&run) else { continue };
                    warn!(job = id, node = b.node, why, "a node dropped out of the copy tree");
                    this.end_copy_run(run, State::Lost, format!("dropped out of the copy tree: {why}"));
                    for child in &b.children {
                        this.feed(facts.clone(), file.clone(), child.clone(), failed.clone());
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            info!(job = id, "copy ended");
        });
    }

    /// Feeds `branch` from the head, from a task; a failure is sent to `failed`.
    fn feed(
        &self,
        facts: FileFacts,
        file: Arc<std::fs::File>,
        branch: Branch,
        failed: mpsc::UnboundedSender<(u64, String)>,
    ) {
        let (secret, max_frame) = (self.secret.clone(), self.cluster.cfg.max_frame);
        tokio::spawn(async move {
            let run = branch.run;
            let plan = Plan { file: facts, tree: branch };
            if let Err(e) = send_file(&secret, max_frame, file, plan).await {
                let _ = failed.send((run, format!("its feed failed: {e}")));
            }
        });
    }
}

/// Sends `file` (the copy's opened source) to `plan.tree`'s relay, then waits for it to close
/// the connection (it does once it has the whole file).
async fn send_file(
    secret: &crate::auth::Secret,
    max_frame: usize,
    file: Arc<std::fs::File>,
    plan: Plan,
) -> Result<(), ProtoError> {
    use std::os::unix::fs::FileExt;
    let size = plan.file.size;
    let mut conn = copy::open_feed(secret, max_frame, plan).await?;
    let mut offset = 0u64;
    while offset < size {
        let len = CHUNK.min(usize::try_from(size - offset).unwrap_or(CHUNK));
        let f = file.clone();
        let buf = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .map_err(std::io::Error::other)??;
        let sum = copy::chunk_sum(&buf);
        conn.send_frame(&Frame::Chunk { offset, sum, data: Bytes::from(buf) }).await?;
        offset += CHUNK as u64;
    }
    copy::close_feed(&mut conn, Duration::from_secs(600)).await
}
