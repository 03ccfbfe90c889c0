//! `hsm/`: the request queue, report files per hint, movers, and the coordinator's switches.

use std::sync::{Arc, Mutex};

use clusterfs_fs::{Answer, Caller, Errno, FsError, Kind, Node, Result};
use dashmap::DashMap;

use super::{ERROR_FILE, FileSpec, README_FILE, Verb, command_text, readme, spec_node, with_usage};
use crate::head::hsm::Hsm;
use crate::hsm::{Action, Intake, Line, MAX_LINE, parse_line};

const DIR_FILES: &[FileSpec] = &[
    README_FILE,
    FileSpec {
        name: "queue",
        kind: Kind::Control,
        perm: 0o644,
        help: "root writes Lustre active_requests lines (or JSON objects), one request per line",
    },
    FileSpec { name: "status", kind: Kind::Snapshot, perm: 0o444, help: "counts per action, one line per mover" },
    FileSpec { name: "movers", kind: Kind::Dir, perm: 0o755, help: "one directory per mover" },
    FileSpec { name: "ctl", kind: Kind::Control, perm: 0o644, help: "root writes a verb below" },
    ERROR_FILE,
];

const MOVER_FILES: &[FileSpec] = &[
    FileSpec { name: "state", kind: Kind::Snapshot, perm: 0o444, help: "up | drained | away for N s | gone" },
    FileSpec {
        name: "slots",
        kind: Kind::Snapshot,
        perm: 0o444,
        help: "per action: `<action> <running> <max>` (max `-`: no limit); then batching slot tags",
    },
    FileSpec { name: "archive_ids", kind: Kind::Snapshot, perm: 0o444, help: "archive ids served (`any`)" },
    FileSpec {
        name: "requests",
        kind: Kind::Snapshot,
        perm: 0o444,
        help: "one line per request it runs: `<cookie> <fid> <action> <bytes>/<total>`",
    },
];

pub const VERBS: &[Verb] = &[
    Verb { name: "lock", args: "", help: "send no request to any mover until unlock (the queue still fills)" },
    Verb { name: "unlock", args: "", help: "dispatch again" },
    Verb { name: "drain", args: "<mover>", help: "send that mover nothing more; what it runs finishes" },
    Verb { name: "resume", args: "<mover>", help: "undo drain" },
    Verb { name: "cancel", args: "<cookie>", help: "cancel a queued or running request (ends with status 125)" },
];

/// Errors listed in full in one answer; the rest are counted.
const ERRORS_SHOWN: usize = 5;

/// A `queue` writer's state between writes: the unfinished last line and the line count.
#[derive(Debug, Default)]
struct Pending {
    partial: Vec<u8>,
    /// The partial line is over the limit: the rest of it is skipped.
    overlong: bool,
    lines: u64,
    ticket: Option<u64>,
    /// The offset the next piece must start at, and pieces that came before their turn.
    next: u64,
    early: std::collections::BTreeMap<u64, Vec<u8>>,
    /// The last refusal, for the rest of a write the kernel retries.
    failed: Option<FsError>,
}

/// What the lines of one write asked for.
#[derive(Debug, Default)]
struct Batch {
    requests: Vec<crate::hsm::Request>,
    cancels: Vec<u64>,
    errors: Vec<String>,
    bad: usize,
}

impl Batch {
    fn error(&mut self, e: String) {
        self.bad += 1;
        if self.errors.len() < ERRORS_SHOWN {
            self.errors.push(e);
        }
    }
}

/// Consumes `data`, the next bytes of the stream: each complete line is parsed into `batch`;
/// the unfinished last line waits in `p` (or is skipped, past the line limit).
fn scan(p: &mut Pending, data: &[u8], batch: &mut Batch) {
    p.next += data.len() as u64;
    let mut rest = data;
    if !p.partial.is_empty() && p.partial.last() == Some(&b'\n') {
        // A final line without its newline, completed by the closing writer.
        p.partial.pop();
        rest = b"\n";
    }
    while let Some(i) = rest.iter().position(|b| *b == b'\n') {
        let piece = &rest[..i];
        rest = &rest[i + 1..];
        p.lines += 1;
        if p.overlong {
            // Refused when it passed the limit; its end is skipped.
            p.overlong = false;
            continue;
        }
        p.partial.extend_from_slice(piece);
        let line = std::mem::take(&mut p.partial);
        let parsed =
            std::str::from_utf8(&line).map_err(|_| "the line is not UTF-8 text".to_string()).and_then(parse_line);
        match parsed {
            Ok(Line::Nothing) => {}
            Ok(Line::Request(r)) => batch.requests.push(r),
            Ok(Line::Cancel(c)) => batch.cancels.push(c),
            Err(e) => batch.error(format!("line {}: {e}", p.lines)),
        }
    }
    if !p.overlong {
        p.partial.extend_from_slice(rest);
        if p.partial.len() > MAX_LINE {
            // Refused now, by the write that took it over the limit: the rest of it is skipped.
            p.partial.clear();
            p.overlong = true;
            batch.error(format!("line {}: a line is at most {MAX_LINE} bytes", p.lines + 1));
        }
    }
}

#[derive(Debug)]
pub struct HsmView {
    hsm: Arc<Hsm>,
    pending: DashMap<u64, Arc<Mutex<Pending>>>,
}

fn text(s: String) -> Answer<Vec<u8>> {
    Answer::Now(Ok(s.into_bytes()))
}

impl HsmView {
    pub fn new(hsm: Arc<Hsm>) -> HsmView {
        HsmView { hsm, pending: DashMap::new() }
    }

    pub fn node(&self, path: &[&str]) -> Result<Node> {
        match path {
            [] => Ok(Node::dir()),
            ["movers"] => Ok(Node::dir()),
            ["movers", m] if self.hsm.has_mover(m) => Ok(Node::dir()),
            ["movers", m, file] if self.hsm.has_mover(m) => {
                spec_node(MOVER_FILES, file).ok_or_else(|| FsError::not_found(format!("hsm/movers/{m}/{file}")))
            }
            [name] => match spec_node(DIR_FILES, name) {
                Some(n) => Ok(n),
                None => {
                    let meta = self.hsm.report_meta(name).ok_or_else(|| FsError::not_found(format!("hsm/{name}")))?;
                    let mut n = Node::new(Kind::Log, 0o444).size(meta.len).mtime(meta.mtime);
                    n.generation = meta.generation;
                    Ok(n)
                }
            },
            _ => Err(FsError::not_found(format!("hsm/{}", path.join("/")))),
        }
    }

    pub fn list(&self, path: &[&str]) -> Result<Vec<String>> {
        match path {
            [] => Ok(DIR_FILES.iter().map(|f| f.name.to_string()).chain(self.hsm.report_names()).collect()),
            ["movers"] => Ok(self.hsm.mover_names()),
            ["movers", m] if self.hsm.has_mover(m) => Ok(MOVER_FILES.iter().map(|f| f.name.to_string()).collect()),
            _ => Err(FsError::not_found(format!("hsm/{}", path.join("/")))),
        }
    }

    pub fn render(&self, path: &[&str]) -> Answer<Vec<u8>> {
        match path {
            ["README"] => Answer::Now(Ok(readme(
                "hsm/: the Lustre HSM coordinator (coordinatool's job)",
                DIR_FILES,
                &[("ctl", VERBS)],
                "Each request tagged `<reporting_hint>=<hint>` in its data is reported in\n\
                 hsm/<hint>, one line per event: `new <fid>`, `assign <fid> <mover>`,\n\
                 `sent <fid> <mover>`, `progress <fid> <mover|global_queue> <pos>/<total>`\n\
                 (queue position while waiting, bytes while running), `done <fid> <status>`.\n",
            ))),
            ["queue"] => text("write: Lustre active_requests lines or JSON objects, one per line\n".into()),
            ["ctl"] => {
                text(VERBS.iter().map(|v| format!("{} {}", v.name, v.args).trim_end().to_string() + "\n").collect())
            }
            ["status"] => text(self.hsm.status()),
            ["movers", m, file] => {
                let Some(v) = self.hsm.mover(m) else {
                    return Answer::Now(Err(FsError::not_found(format!("hsm/movers/{m}"))));
                };
                match *file {
                    "state" => text(format!("{}\n", v.state)),
                    "slots" => text(
                        Action::ALL
                            .iter()
                            .map(|a| {
                                let max = v.info.slots(*a).map_or("-".to_string(), |n| n.to_string());
                                format!("{} {} {max}\n", a.word(), v.running.get(a).copied().unwrap_or(0))
                            })
                            .chain(v.slot_tags.iter().map(|t| format!("batch {t}\n")))
                            .collect(),
                    ),
                    "archive_ids" => text(if v.info.archive_ids.is_empty() {
                        "any\n".into()
                    } else {
                        v.info.archive_ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ") + "\n"
                    }),
                    "requests" => text(
                        v.requests
                            .iter()
                            .map(|(c, fid, a, b, t)| format!("{c:#x} {fid} {} {b}/{t}\n", a.word()))
                            .collect(),
                    ),
                    _ => Answer::Now(Err(FsError::not_found(format!("hsm/movers/{m}/{file}")))),
                }
            }
            _ => Answer::Now(Err(FsError::not_found(format!("hsm/{}", path.join("/"))))),
        }
    }

    pub fn read_log(&self, path: &[&str], offset: u64, size: u32) -> Result<Vec<u8>> {
        match path {
            [hint] => match self.hsm.report_read(hint, offset, size) {
                Some(Ok(data)) => Ok(data),
                Some(Err(e)) => Err(FsError::new(Errno::Io, format!("reading hsm/{hint}: {e}"))),
                None => Err(FsError::not_found(format!("hsm/{hint}"))),
            },
            _ => Err(FsError::invalid("not a log file")),
        }
    }

    pub fn write(&self, path: &[&str], caller: &Caller, handle: u64, offset: u64, data: &[u8]) -> Answer<Vec<u8>> {
        if caller.uid != 0 {
            return Answer::Now(Err(FsError::denied("only root acts on the HSM coordinator")));
        }
        match path {
            ["queue"] => {
                let slot = self.pending.entry(handle).or_default().clone();
                let mut p = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                Answer::Now(self.take(&mut p, offset, data, false))
            }
            ["ctl"] => Answer::Now(command_text(data, 256).and_then(|t| self.ctl(t)).map(|()| Vec::new())),
            _ => Answer::Now(Err(FsError::denied("this file is read-only"))),
        }
    }

    fn ctl(&self, text: &str) -> Result<()> {
        let usage = |e| with_usage(e, "hsm/ctl", VERBS);
        let (verb, arg) = text.split_once(char::is_whitespace).map_or((text, ""), |(v, a)| (v, a.trim()));
        match (verb, arg) {
            ("lock", "") => self.hsm.set_locked(true),
            ("unlock", "") => self.hsm.set_locked(false),
            ("drain", m) if !m.is_empty() => self.hsm.set_drained(m, true),
            ("resume", m) if !m.is_empty() => self.hsm.set_drained(m, false),
            ("cancel", c) if !c.is_empty() => {
                let cookie = c
                    .strip_prefix("0x")
                    .map_or_else(|| c.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
                    .ok_or_else(|| usage(FsError::invalid(format!("{c:?} is not a cookie"))))?;
                self.hsm.cancel(cookie).map_err(|e| FsError::new(Errno::NoEnt, e))
            }
            ("lock" | "unlock" | "drain" | "resume" | "cancel", _) => {
                Err(usage(FsError::invalid(format!("wrong arguments for {verb}: {arg:?}"))))
            }
            _ => Err(usage(FsError::invalid(format!("unknown verb {verb:?}")))),
        }
    }

    /// Takes the complete lines of the write at `offset` (all of it when `last`), queues the
    /// good ones and answers for the bad ones with their line numbers. The kernel may send the
    /// pieces of one large write out of order: pieces ahead of the next offset wait for it.
    fn take(&self, p: &mut Pending, offset: u64, data: &[u8], last: bool) -> Result<Vec<u8>> {
        let mut batch = Batch::default();
        if let Some(e) = p.failed.clone().filter(|_| offset + data.len() as u64 <= p.next && !data.is_empty()) {
            // The rest of a write the kernel cut short after a refused line: refused again.
            return Err(e);
        }
        if offset > p.next {
            p.early.insert(offset, data.to_vec());
        } else {
            let skip = usize::try_from(p.next - offset).unwrap_or(usize::MAX).min(data.len());
            scan(p, &data[skip..], &mut batch);
            while let Some(more) = p.early.remove(&p.next) {
                scan(p, &more, &mut batch);
            }
        }
        if last && (!p.partial.is_empty() || p.overlong) {
            p.partial.push(b'\n');
            scan(p, &[], &mut batch);
        }
        let offered = batch.requests.len();
        let (queued, ticket) = self.hsm.enqueue_later(std::mem::take(&mut batch.requests));
        p.ticket = Some(ticket);
        let mut canceled = 0;
        for c in std::mem::take(&mut batch.cancels) {
            match self.hsm.cancel(c) {
                Ok(()) => canceled += 1,
                Err(e) => batch.error(e),
            }
        }
        if batch.bad > 0 {
            let more = if batch.bad > batch.errors.len() {
                format!("; and {} more", batch.bad - batch.errors.len())
            } else {
                String::new()
            };
            let e = FsError::invalid(format!(
                "{} line(s) refused, {queued} request(s) queued: {}{more}",
                batch.bad,
                batch.errors.join("; ")
            ));
            p.failed = Some(e.clone());
            return Err(e);
        }
        Ok(format!("queued {queued} duplicate {} canceled {canceled}\n", offered - queued).into_bytes())
    }

    /// Close of a `queue` writer: its last line without a newline is taken, then its requests
    /// are durable before close returns.
    pub fn flush(&self, path: &[&str], handle: u64) -> Answer<()> {
        let Some(slot) = self.pending.get(&handle).filter(|_| path == ["queue"]).map(|s| s.clone()) else {
            return Answer::Now(Ok(()));
        };
        let taken = {
            let mut p = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let r = if p.partial.is_empty() && !p.overlong { Ok(Vec::new()) } else { self.take(&mut p, 0, &[], true) };
            r.map(|_| p.ticket)
        };
        let hsm = self.hsm.clone();
        match taken {
            Err(e) => Answer::Now(Err(e)),
            Ok(None) => Answer::Now(Ok(())),
            Ok(Some(ticket)) => super::blocking(move || hsm.durable(ticket)),
        }
    }

    pub fn release(&self, path: &[&str], handle: u64) {
        if path == ["queue"] {
            if let Some((_, slot)) = self.pending.remove(&handle) {
                let mut p = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if !p.partial.is_empty() || p.overlong {
                    let _ = self.take(&mut p, 0, &[], true);
                }
            }
        }
    }

    pub fn status(&self) -> String {
        self.hsm.summary()
    }
}
