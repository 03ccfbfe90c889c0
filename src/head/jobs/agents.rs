//! What agents tell the head about runs: their list on (re)connect, output, and exits.

use std::collections::HashSet;
use std::io::Write as _;
use std::sync::Arc;

use tracing::{info, warn};

use super::{Jobs, State, now_ms};
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
    pub fn output(&self, node: &str, stream: u64, offset: u64, data: &[u8]) -> Result<Option<Message>, Stray> {
        let (run, s) = split_stream(stream);
        if !self.runs_on(run, node) {
            return Err(Stray);
        }
        let len = self.output_len(run, s);
        if offset > len {
            return Ok(Some(Message::Resume {
                run,
                from: [self.output_len(run, STDOUT), self.output_len(run, STDERR)],
            }));
        }
        let skip = usize::try_from(len - offset).unwrap_or(usize::MAX).min(data.len());
        if skip < data.len() {
            let appended = self.open_spool(run, s).and_then(|mut f| f.write_all(&data[skip..]));
            if let Err(e) = appended {
                warn!(job = run, error = %e, "cannot write job output to the spool");
            }
            self.changed.notify_waiters();
        }
        Ok(None)
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
        if have != len {
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
        });
        if let Ok((_, ticket)) = ended {
            self.forget_when_durable(node, run, ticket);
        }
        None
    }
}
