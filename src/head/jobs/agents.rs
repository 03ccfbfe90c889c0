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
                out.push(Message::Resume { run: id, from: [self.output_len(id, STDOUT), self.output_len(id, STDERR)] });
            } else if confirmed {
                let _ = self.update(id, |j| {
                    j.state = State::Lost;
                    j.reason = format!("the agent on {node} no longer knows it");
                    j.ended_ms = Some(now_ms());
                });
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
            return Ok(Some(Message::Resume {
                run,
                from: [self.output_len(run, STDOUT), self.output_len(run, STDERR)],
            }));
        }
        let skip = usize::try_from(len - offset).unwrap_or(usize::MAX).min(data.len());
        let room = usize::try_from(cap.saturating_sub(len)).unwrap_or(usize::MAX);
        let new = &data[skip..];
        if !new.is_empty() {
            let kept = &new[..new.len().min(room)];
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
        let have = [self.output_len(run, STDOUT), self.output_len(run, STDERR)];
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
