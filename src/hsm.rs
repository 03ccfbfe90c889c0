//! Lustre HSM requests: fids, actions, `active_requests` lines and JSON, as head and movers share them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted request line (Lustre prints about 300 bytes).
pub const MAX_LINE: usize = 64 * 1024;
/// Longest accepted request data, decoded.
pub const MAX_DATA: usize = 4096;

/// A Lustre file identifier, printed `[0xSEQ:0xOID:0xVER]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fid {
    pub seq: u64,
    pub oid: u32,
    pub ver: u32,
}

impl fmt::Display for Fid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}:{:#x}:{:#x}]", self.seq, self.oid, self.ver)
    }
}

/// A number as C's `%#llx` prints it (`0` or `0x1f`), or plain decimal.
fn number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.len() <= 16 => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !text.is_empty() && text.len() <= 20 && text.bytes().all(|b| b.is_ascii_digit()) => text.parse().ok(),
        None => None,
    }
}

impl Fid {
    /// `[0x200000401:0x1:0x0]`, with or without the brackets.
    pub fn parse(text: &str) -> Result<Fid, String> {
        let bad = || format!("{text:?} is not a fid like [0x200000401:0x1:0x0]");
        let inner = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text);
        let mut parts = inner.split(':');
        let (Some(seq), Some(oid), Some(ver), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let small = |t: &str| number(t).and_then(|n| u32::try_from(n).ok());
        match (number(seq), small(oid), small(ver)) {
            (Some(seq), Some(oid), Some(ver)) => Ok(Fid { seq, oid, ver }),
            _ => Err(bad()),
        }
    }
}

/// What a request asks of a mover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Restore,
    Remove,
    Archive,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Restore, Action::Remove, Action::Archive];

    /// The name Lustre prints (`ARCHIVE`).
    pub fn lustre(self) -> &'static str {
        match self {
            Action::Archive => "ARCHIVE",
            Action::Restore => "RESTORE",
            Action::Remove => "REMOVE",
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Action::Archive => "archive",
            Action::Restore => "restore",
            Action::Remove => "remove",
        }
    }
}

/// One HSM request, as queued by the head and sent to a mover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub cookie: u64,
    pub fid: Fid,
    pub dfid: Fid,
    pub action: Action,
    pub archive_id: u32,
    #[serde(default)]
    pub flags: u64,
    /// Offset and length (`u64::MAX`: to the end).
    #[serde(default = "whole")]
    pub extent: (u64, u64),
    #[serde(default)]
    pub gid: u64,
    /// The request's data (`tag=foo,cr=campaign42`), decoded.
    #[serde(default)]
    pub data: String,
    /// The owner of the file, when known (for fair share by uid).
    #[serde(default)]
    pub uid: Option<u32>,
}

fn whole() -> (u64, u64) {
    (0, u64::MAX)
}

/// What one line of `hsm/queue` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A header, a blank line or a comment: nothing.
    Nothing,
    Request(Request),
    /// Lustre's CANCEL of the request with this cookie.
    Cancel(u64),
}

/// The JSON form of a request line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest {
    fid: String,
    dfid: Option<String>,
    cookie: serde_json::Value,
    action: String,
    #[serde(default = "one")]
    archive_id: u32,
    #[serde(default)]
    data: String,
    uid: Option<u32>,
}

fn one() -> u32 {
    1
}

/// Parses one line: Lustre `active_requests` (as `lctl get_param` prints it, header included) or
/// a JSON object. The error is a sentence naming what is wrong.
pub fn parse_line(line: &str) -> Result<Line, String> {
    if line.len() > MAX_LINE {
        return Err(format!("a line is at most {MAX_LINE} bytes (got {})", line.len()));
    }
    if line.contains('\0') {
        return Err("the line contains a NUL byte".into());
    }
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') || (line.starts_with("mdt.") && line.ends_with('=')) {
        return Ok(Line::Nothing);
    }
    if line.starts_with('{') {
        return parse_json(line);
    }
    let mut fid = None;
    let mut dfid = None;
    let mut cookie = None;
    let mut action = None;
    let mut archive_id = None;
    let mut flags = 0;
    let mut extent = whole();
    let mut gid = 0;
    let mut data = String::new();
    let mut canceled = false;
    for (key, value) in fields(line)? {
        let bad = |what: &str| format!("{key}={value} is not {what}");
        match key {
            "fid" => fid = Some(Fid::parse(value).map_err(|e| format!("fid: {e}"))?),
            "dfid" => dfid = Some(Fid::parse(value).map_err(|e| format!("dfid: {e}"))?),
            "compound/cookie" => {
                let (_, c) = value.split_once('/').ok_or_else(|| bad("compound/cookie like 0x0/0x5f1e2d3c"))?;
                cookie = Some(number(c).ok_or_else(|| bad("compound/cookie like 0x0/0x5f1e2d3c"))?);
            }
            "action" => {
                action = Some(match value {
                    "ARCHIVE" => Some(Action::Archive),
                    "RESTORE" => Some(Action::Restore),
                    "REMOVE" => Some(Action::Remove),
                    "CANCEL" => None,
                    _ => return Err(bad("an action (ARCHIVE, RESTORE, REMOVE or CANCEL)")),
                })
            }
            "archive#" => {
                archive_id =
                    Some(number(value).and_then(|n| u32::try_from(n).ok()).ok_or_else(|| bad("an archive number"))?)
            }
            "flags" => flags = number(value).ok_or_else(|| bad("a number"))?,
            "gid" => gid = number(value).ok_or_else(|| bad("a number"))?,
            "extent" => {
                let (a, b) = value.split_once('-').ok_or_else(|| bad("an extent like 0x0-0xffffffffffffffff"))?;
                extent = match (number(a), number(b)) {
                    (Some(a), Some(b)) => (a, b),
                    _ => return Err(bad("an extent like 0x0-0xffffffffffffffff")),
                };
            }
            "data" => data = decode_data(value).map_err(|e| format!("data: {e}"))?,
            "canceled" => canceled = value != "0",
            // Printed by some Lustre versions, or about the request's life in the MDT.
            "lrh" | "uuid" | "done" | "status" | "datalen" | "create" | "change" => {}
            _ => return Err(format!("unknown field {key:?}")),
        }
    }
    let need = |what: &str| format!("the line has no {what}= field");
    let fid = fid.ok_or_else(|| need("fid"))?;
    let cookie = cookie.ok_or_else(|| need("compound/cookie"))?;
    let action = action.ok_or_else(|| need("action"))?;
    let archive_id = archive_id.ok_or_else(|| need("archive#"))?;
    if canceled {
        return Ok(Line::Cancel(cookie));
    }
    Ok(match action {
        None => Line::Cancel(cookie),
        Some(action) => Line::Request(Request {
            cookie,
            fid,
            dfid: dfid.unwrap_or(fid),
            action,
            archive_id,
            flags,
            extent,
            gid,
            data,
            uid: None,
        }),
    })
}

/// `key=value` fields separated by spaces; a value that opens a `[` runs to its `]`.
fn fields(line: &str) -> Result<Vec<(&str, &str)>, String> {
    let mut out = Vec::new();
    let mut rest = line;
    while !rest.is_empty() {
        let (key, after) =
            rest.split_once('=').ok_or_else(|| format!("{:?} is not a key=value field", first_word(rest)))?;
        if key.is_empty() || key.contains(' ') {
            return Err(format!("{:?} is not a key=value field", first_word(rest)));
        }
        let end = if after.starts_with('[') {
            after.find(']').map(|i| i + 1).ok_or_else(|| format!("{key}= opens a [ that is never closed"))?
        } else {
            after.find(' ').unwrap_or(after.len())
        };
        out.push((key, &after[..end]));
        rest = after[end..].trim_start();
        if end < after.len() && !after[end..].starts_with(' ') {
            return Err(format!("{key}= is followed by {:?} without a space", first_word(&after[end..])));
        }
    }
    Ok(out)
}

fn first_word(s: &str) -> String {
    s.split(' ').next().unwrap_or(s).chars().take(40).collect()
}

/// `[74616730]` (hex bytes, as Lustre dumps them) to text.
fn decode_data(value: &str) -> Result<String, String> {
    let hex = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .ok_or_else(|| format!("{value:?} is not hex bytes in brackets"))?;
    if hex.len() > MAX_DATA * 2 {
        return Err(format!("at most {MAX_DATA} bytes"));
    }
    let bytes = hex::decode(hex).map_err(|e| format!("{hex:?} is not hex bytes: {e}"))?;
    // Lustre pads the data it prints with NULs.
    let text = bytes.split(|b| *b == 0).next().unwrap_or_default();
    String::from_utf8(text.to_vec()).map_err(|_| "the decoded data is not UTF-8 text".into())
}

fn parse_json(line: &str) -> Result<Line, String> {
    let j: JsonRequest = serde_json::from_str(line).map_err(|e| format!("JSON: {e}"))?;
    let cookie = match &j.cookie {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => number(s),
        _ => None,
    }
    .ok_or_else(|| format!("JSON: cookie {} is not a number", j.cookie))?;
    let fid = Fid::parse(&j.fid).map_err(|e| format!("JSON: fid: {e}"))?;
    let dfid = match &j.dfid {
        Some(d) => Fid::parse(d).map_err(|e| format!("JSON: dfid: {e}"))?,
        None => fid,
    };
    if j.data.len() > MAX_DATA || j.data.contains('\0') {
        return Err(format!("JSON: data is at most {MAX_DATA} bytes of text"));
    }
    let action = match j.action.to_ascii_lowercase().as_str() {
        "archive" => Action::Archive,
        "restore" => Action::Restore,
        "remove" => Action::Remove,
        "cancel" => return Ok(Line::Cancel(cookie)),
        other => return Err(format!("JSON: action {other:?} is not archive, restore, remove or cancel")),
    };
    Ok(Line::Request(Request {
        cookie,
        fid,
        dfid,
        action,
        archive_id: j.archive_id,
        flags: 0,
        extent: whole(),
        gid: 0,
        data: j.data,
        uid: j.uid,
    }))
}

impl Request {
    /// The request as Lustre's `active_requests` prints it.
    pub fn to_line(&self) -> String {
        format!(
            "fid={} dfid={} compound/cookie=0x0/{:#x} action={} archive#={} flags={:#x} extent={:#x}-{:#x} gid={:#x} data=[{}] canceled=0 uuid=clusterfs done=0",
            self.fid,
            self.dfid,
            self.cookie,
            self.action.lustre(),
            self.archive_id,
            self.flags,
            self.extent.0,
            self.extent.1,
            self.gid,
            hex::encode_upper(&self.data)
        )
    }
}

/// The value of `key=` in request data (`bar,cr=foo,moo` gives `foo` for `cr`).
pub fn tag<'a>(data: &'a str, key: &str) -> Option<&'a str> {
    data.split(',').find_map(|part| part.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// A report hint: 1-64 characters of `[A-Za-z0-9_-]`, and not a name the tree uses itself
/// (`hsm/status` is never a report file).
pub fn valid_hint(hint: &str) -> bool {
    (1..=64).contains(&hint.len())
        && hint.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && !crate::names::RESERVED.contains(&hint)
}

/// What a mover tells the head it is, after each connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoverInfo {
    /// Archive ids it serves; empty: any.
    pub archive_ids: Vec<u32>,
    /// Requests of each action it runs at once; none: no limit.
    pub max_archive: Option<u32>,
    pub max_restore: Option<u32>,
    pub max_remove: Option<u32>,
}

impl MoverInfo {
    pub fn slots(&self, action: Action) -> Option<u32> {
        match action {
            Action::Archive => self.max_archive,
            Action::Restore => self.max_restore,
            Action::Remove => self.max_remove,
        }
    }

    pub fn serves(&self, archive_id: u32) -> bool {
        self.archive_ids.is_empty() || self.archive_ids.contains(&archive_id)
    }
}

/// Where a mover stands with one request, as it reports after connecting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub cookie: u64,
    pub bytes: u64,
    pub total: u64,
    /// Its status once it ended (0, or a positive errno); none while it runs.
    pub status: Option<i32>,
}

/// Something that takes HSM requests: `hsm/queue`, or a Lustre copytool front end.
pub trait Intake {
    /// Queues `requests`, durably, skipping any whose cookie is known; returns how many were new.
    fn enqueue(&self, requests: Vec<Request>) -> Result<usize, String>;
    /// Cancels the request with `cookie`: a queued one at once, a running one by its mover.
    fn cancel(&self, cookie: u64) -> Result<(), String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "fid=[0x200000401:0x1:0x0] dfid=[0x200000401:0x1:0x0] compound/cookie=0x0/0x5f1e2d3c action=ARCHIVE archive#=1 flags=0x0 extent=0x0-0xffffffffffffffff gid=0x0 data=[63723D63616D706169676E3432] canceled=0 uuid=0e12f0a4-1b2c-4d5e-8f90-a1b2c3d4e5f6 done=0";

    #[test]
    fn a_lustre_line_parses_with_its_data_decoded() {
        let Line::Request(r) = parse_line(LINE).unwrap() else { panic!("not a request") };
        assert_eq!(r.fid, Fid { seq: 0x200000401, oid: 1, ver: 0 });
        assert_eq!(r.cookie, 0x5f1e2d3c);
        assert_eq!(r.action, Action::Archive);
        assert_eq!(r.archive_id, 1);
        assert_eq!(r.extent, (0, u64::MAX));
        assert_eq!(r.data, "cr=campaign42");
        assert_eq!(r.fid.to_string(), "[0x200000401:0x1:0x0]");
        assert_eq!(parse_line(&r.to_line()).unwrap(), Line::Request(r));
    }

    #[test]
    fn headers_blank_lines_and_c_style_zeros() {
        assert_eq!(parse_line("mdt.lustre0-MDT0000.hsm.active_requests=").unwrap(), Line::Nothing);
        assert_eq!(parse_line("   ").unwrap(), Line::Nothing);
        let l = "fid=[0x200000401:0x2:0x0] dfid=[0x200000401:0x2:0x0] compound/cookie=0/0x7 action=RESTORE archive#=2 flags=0 extent=0-0xffffffffffffffff gid=0 data=[] canceled=0 uuid=x done=0";
        let Line::Request(r) = parse_line(l).unwrap() else { panic!() };
        assert_eq!((r.cookie, r.action, r.archive_id), (7, Action::Restore, 2));
        assert_eq!(parse_line(&l.replace("action=RESTORE", "action=CANCEL")).unwrap(), Line::Cancel(7));
        assert_eq!(parse_line(&l.replace("canceled=0", "canceled=1")).unwrap(), Line::Cancel(7));
    }

    #[test]
    fn each_broken_field_is_named() {
        for (from, to, says) in [
            ("fid=[0x200000401:0x1:0x0] ", "fid=[0x2000zz:0x1:0x0] ", "fid"),
            ("dfid=[0x200000401:0x1:0x0]", "dfid=[1:2]", "dfid"),
            ("compound/cookie=0x0/0x5f1e2d3c", "compound/cookie=0x5f1e2d3c", "compound/cookie"),
            ("compound/cookie=0x0/0x5f1e2d3c", "compound/cookie=0x0/0xq", "compound/cookie"),
            ("action=ARCHIVE", "action=ARCHIVAL", "action"),
            ("archive#=1", "archive#=0x100000000", "archive#"),
            ("flags=0x0", "flags=zero", "flags"),
            ("extent=0x0-0xffffffffffffffff", "extent=0x0", "extent"),
            ("gid=0x0", "gid=-1", "gid"),
            ("data=[63723D63616D706169676E3432]", "data=[6", "never closed"),
            ("data=[63723D63616D706169676E3432]", "data=[6G]", "data"),
            (" canceled=0", " canceled", "key=value"),
            ("action=ARCHIVE ", "", "no action"),
            ("uuid=", "color=", "unknown field"),
        ] {
            let line = LINE.replacen(from, to, 1);
            let err = parse_line(&line).unwrap_err();
            assert!(err.contains(says), "{to}: {err}");
        }
        assert!(parse_line(&LINE[..60]).is_err());
        assert!(parse_line(&"x".repeat(MAX_LINE + 1)).unwrap_err().contains("at most"));
    }

    #[test]
    fn json_requests() {
        let l = r#"{"fid":"[0x200000401:0x3:0x0]","cookie":"0x10","action":"restore","archive_id":3,"data":"cr=x","uid":1000}"#;
        let Line::Request(r) = parse_line(l).unwrap() else { panic!() };
        assert_eq!((r.cookie, r.action, r.archive_id, r.uid), (16, Action::Restore, 3, Some(1000)));
        assert!(parse_line(r#"{"fid":"x","cookie":1,"action":"archive"}"#).unwrap_err().contains("fid"));
        assert!(parse_line(r#"{"fid":"0x1:0x1:0x0","cookie":1,"action":"archive","colour":1}"#).is_err());
        assert_eq!(parse_line(r#"{"fid":"0x1:0x1:0x0","cookie":9,"action":"cancel"}"#).unwrap(), Line::Cancel(9));
    }

    #[test]
    fn tags_and_hints() {
        assert_eq!(tag("bar,cr=foo,moo", "cr"), Some("foo"));
        assert_eq!(tag("cr=foo", "cr"), Some("foo"));
        assert_eq!(tag("xcr=foo", "cr"), None);
        assert!(valid_hint("campaign_42-a"));
        assert!(!valid_hint("a/b") && !valid_hint("") && !valid_hint(&"a".repeat(65)));
        assert!(!valid_hint("status") && !valid_hint("queue") && !valid_hint("README"));
    }
}
