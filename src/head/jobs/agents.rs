//! What agents tell the head about runs: their list on (re)connect, output, and exits.

use std::collections::HashSet;
use std::io::Write as _;
use std::sync::Arc;

use tracing::{info, warn};

use super::{Jobs, State, now_ms};
use crate::images::size_text;
use crate::jobs::{Exit, RunStatus, STDERR, STDOUT, split_stream};
use crate::proto::Message;

/// A frame about a run that is not running on the node that sent it (a late report of a run
/// declared lost, or a forgery): ignored.
#[derive(Debug)]
pub struct Stray;

impl Jobs {
    /// An agent (re)connected and listed its runs: resume, resend, forget or declare lost.
    pub fn reconcile(self: &Arc<Self>, node: &str, runs: Vec<RunStatus>) -> Vec<Message> {
        let known: HashSet<u64> = runs.iter().map(|r| r.run).collect();
        let mut out = Vec::new();
        let here = self
            .scan(|j| (j.state == State::Running && j.node.as_deref() == Some(node)).then_some((j.id, j.confirmed)));
        for (id, confirmed) in here {
            if known.contains(&id) {
                out.push(Message::Resume { run: id, from: self.output_lens(id) });
            } else if confirmed {
                let _ = self.update(id, |j| {
                    j.state = State::Lost;
                    j.reason = format!("the agent on {node} no longer knows it");
                    j.ended_ms = Some(now_ms());
                });
                self.end_lines(id, node);
            } else if let Some(job) = self.get(id) {
                self.dispatch(job);
            }
        }
        for r in runs {
            if !self.runs_on(r.run, node) {
                self.forget_later(node, r.run);
            }
        }
        out
    }

    /// Output from an agent; returns a resume request when a gap shows data was missed.
    /// `Err(Stray)` when the run is not running on `node`: nothing was done.
    pub fn output(
        self: &Arc<Self>,
        node: &str,
        stream: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<Option<Message>, Stray> {
        let (run, s) = split_stream(stream);
        if !self.runs_on(run, node) {
            return Err(Stray);
        }
        let (len, cap) = (self.output_len(run, s), self.max_output());
        if offset > len {
            // Past the limit, the rest is dropped, not asked for again.
            if len >= cap {
                return Ok(None);
            }
            return Ok(Some(Message::Resume { run, from: self.output_lens(run) }));
        }
        let skip = usize::try_from(len - offset).unwrap_or(usize::MAX).min(data.len());
        let room = usize::try_from(cap.saturating_sub(len)).unwrap_or(usize::MAX);
        let new = &data[skip..];
        if !new.is_empty() {
            let kept = &new[..new.len().min(room)];
            self.merge_lines(run, s, node, len, kept);
            let appended = self.open_spool(run, s).and_then(|mut f| f.write_all(kept));
            if let Err(e) = appended {
                warn!(job = run, error = %e, "cannot write job output to the spool");
            }
            if kept.len() < new.len() {
                self.over_limit(run, s, cap);
            }
            self.changed.notify_waiters();
        }
        Ok(None)
    }

    /// The job run `run` (on `node`) belongs to, and the tag of its lines there: an array
    /// task's index, a multi-node run's node name. None for a job of its own.
    fn gathered_in(&self, run: u64, node: &str) -> Option<(u64, String)> {
        let task = self.with(run, |j| j.task).flatten()?;
        Some((task.parent, if task.attempt.is_some() { node.to_string() } else { task.index.to_string() }))
    }

    /// For a run of a multi-node or array job: adds `data` (its stream `s`, which held `len`
    /// bytes before) to the job's own stream as whole lines, each prefixed with the node's name
    /// (`cn3: text`, as clush and pdsh print them) or the task's index (`7: text`), so
    /// `tail -f jobs/<id>/stdout` follows them all at once. A line longer than
    /// [`LONGEST_LINE`] is passed on in pieces.
    fn merge_lines(&self, run: u64, s: u64, node: &str, len: u64, data: &[u8]) {
        let Some((parent, tag)) = self.gathered_in(run, node) else { return };
        let mut partial = self.partial.entry((run, s)).or_insert_with(|| self.unfinished_line(run, s, len));
        partial.extend_from_slice(data);
        let mut out = Vec::new();
        let mut done = 0;
        while let Some(nl) = partial[done..].iter().position(|b| *b == b'\n') {
            prefixed(&mut out, &tag, &partial[done..=done + nl]);
            done += nl + 1;
        }
        if partial.len() - done > LONGEST_LINE {
            prefixed(&mut out, &tag, &partial[done..]);
            done = partial.len();
        }
        partial.drain(..done);
        drop(partial);
        self.append_merged(parent, s, &out);
    }

    /// A run's output after its last newline, read back from its spool: what `partial` held
    /// before a head restart.
    fn unfinished_line(&self, run: u64, s: u64, len: u64) -> Vec<u8> {
        let from = len.saturating_sub(LONGEST_LINE as u64);
        let mut tail =
            crate::jobs::read_spooled(&self.spool_path(run, s), from, (len - from) as usize).unwrap_or_default();
        match tail.iter().rposition(|b| *b == b'\n') {
            Some(nl) => tail.split_off(nl + 1),
            None if from == 0 => tail,
            None => Vec::new(),
        }
    }

    /// A run of a multi-node or array job ended: its last line, if unfinished, joins the
    /// job's streams.
    pub(super) fn end_lines(&self, run: u64, node: &str) {
        let Some((parent, tag)) = self.gathered_in(run, node) else { return };
        for s in [STDOUT, STDERR] {
            let rest = match self.partial.remove(&(run, s)) {
                Some((_, rest)) => rest,
                None => self.unfinished_line(run, s, self.output_len(run, s)),
            };
            if !rest.is_empty() {
                let mut out = Vec::new();
                prefixed(&mut out, &tag, &rest);
                self.append_merged(parent, s, &out);
            }
        }
    }

    /// Appends to a multi-node or array job's own stream, up to `max_output` (each run's
    /// stream keeps all of its own).
    fn append_merged(&self, parent: u64, s: u64, out: &[u8]) {
        if out.is_empty() || self.output_len(parent, s) >= self.max_output() {
            return;
        }
        if let Err(e) = self.open_spool(parent, s).and_then(|mut f| f.write_all(out)) {
            warn!(job = parent, error = %e, "cannot write a job's gathered lines to the spool");
        }
    }

    /// `max_output` in bytes (no limit: the most there is).
    fn max_output(&self) -> u64 {
        if self.cfg.max_output.0 == 0 { u64::MAX } else { self.cfg.max_output.0 }
    }

    /// Kills run `run`, whose stream `s` passed `cap`, once.
    fn over_limit(self: &Arc<Self>, run: u64, s: u64, cap: u64) {
        if self.with(run, |j| j.killed_by.is_some()).unwrap_or(true) {
            return;
        }
        let stream = if s == STDOUT { "stdout" } else { "stderr" };
        let who = format!("clusterfs: its {stream} passed max_output ({}; the rest was dropped)", size_text(cap));
        warn!(job = run, stream, cap, "a run wrote more than max_output: killing it");
        let jobs = self.clone();
        tokio::spawn(async move {
            if let Err(e) = jobs.signal_run(run, libc::SIGTERM, &who).await {
                warn!(job = run, error = %e, "cannot kill a run past max_output");
            }
        });
    }

    /// A run ended on `node`. Accepted once all its output is here; then the agent may forget it.
    /// `Err(Stray)` when the run is not running on `node`: nothing was done.
    pub fn exited(self: &Arc<Self>, node: &str, run: u64, exit: Exit, len: [u64; 2]) -> Result<Option<Message>, Stray> {
        if !self.runs_on(run, node) {
            return Err(Stray);
        }
        Ok(self.accept_exit(node, run, exit, len))
    }

    fn accept_exit(self: &Arc<Self>, node: &str, run: u64, exit: Exit, len: [u64; 2]) -> Option<Message> {
        let killed_by = self.with(run, |j| j.killed_by.clone())?;
        let have = self.output_lens(run);
        // What passed max_output was dropped: all there is to wait for is up to it.
        let cap = self.max_output();
        if have != len.map(|l| l.min(cap)) {
            return Some(Message::Resume { run, from: have });
        }
        let (state, reason) = match (&killed_by, &exit.reason) {
            (Some(who), _) => (State::Killed, format!("by {who}")),
            (None, Some(r)) if r.starts_with("timeout") => {
                (State::Timeout, r.trim_start_matches("timeout ").to_string())
            }
            (None, Some(r)) => (State::Failed, r.clone()),
            (None, None) if exit.code == 0 => (State::Done, String::new()),
            (None, None) => (State::Failed, String::new()),
        };
        info!(job = run, node, code = exit.code, state = state.word(), "job ended");
        self.end_lines(run, node);
        let ended = self.update_later(run, |j| {
            j.state = state;
            j.reason = reason;
            j.exit = Some(exit);
            j.ended_ms = Some(now_ms());
            j.spooled = Some(have);
        });
        if let Ok((_, ticket)) = ended {
            self.forget_when_durable(node, run, ticket);
        }
        None
    }
}

/// Bytes of one run's line held back waiting for its end, at most.
const LONGEST_LINE: usize = 64 * 1024;

/// Adds `line` to `out` as `tag: line`, ending it with a newline if it has none.
fn prefixed(out: &mut Vec<u8>, tag: &str, line: &[u8]) {
    out.extend_from_slice(tag.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(line);
    if !line.ends_with(b"\n") {
        out.push(b'\n');
    }
}
