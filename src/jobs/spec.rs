//! Job specs as users write them: one shell line, `#CLUSTER key=value` directives then a
//! script, or one JSON object. Every key is checked; the error names it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Largest spec accepted, in bytes.
pub const MAX_SPEC: usize = 1 << 20;

/// The keys a spec may set, with what each takes (for errors and the README).
pub const KEYS: &[(&str, &str)] = &[
    ("name", "a label of 1-63 printable characters, no spaces"),
    ("nodes", "a count (2) or a nodeset (cn[0-7], @group): a nodeset runs on every node in it"),
    ("cpus", "CPUs reserved on the node, 1-1024"),
    ("mem", "memory reserved and enforced: 512M, 2G (K, M, G, T are powers of 1024)"),
    ("timeout", "seconds, or with a unit: 90s, 10m, 2h, 1d"),
    ("cwd", "absolute working directory on the node (default: the user's home)"),
    ("env.NAME", "an environment variable for the job"),
    ("rootfs", "absolute path of a directory tree the job runs chrooted in"),
    ("after", "job ids that must end with exit 0 first: 41 or 41,42"),
    ("afterany", "job ids that must end (any way) first"),
    ("array", "array task indexes, with an optional limit of tasks at once: 1-16%4"),
    ("isolate", "ns (own PID, mount, IPC, UTS namespaces; the default) or none"),
    ("priority", "-1000 to 1000, default 0: higher starts first (only root may go above 0)"),
    ("copy", "instead of a script: an absolute path on the head, sent to every node of `nodes`"),
    ("dest", "with copy: the absolute path on each node; %n is the node's name"),
    ("fanout", "with copy: how many nodes each relays to, 1-64 (default 8)"),
];

/// How a job is isolated on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Isolate {
    #[default]
    Ns,
    None,
}

/// Where a job runs: a count of nodes chosen by the head, or a nodeset (every node in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Nodes {
    Count(u32),
    Set(String),
}

impl Default for Nodes {
    fn default() -> Nodes {
        Nodes::Count(1)
    }
}

/// Array tasks: the indexes, and how many may run at once (0: no limit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Array {
    pub indexes: Vec<u32>,
    pub limit: u32,
}

/// A checked job spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Spec {
    /// Shared, not copied, with every copy of the job (up to MAX_SPEC bytes).
    pub script: Arc<str>,
    pub name: Option<String>,
    pub nodes: Nodes,
    pub cpus: u32,
    pub mem: Option<u64>,
    pub timeout_s: Option<u64>,
    pub cwd: Option<String>,
    pub env: BTreeMap<String, String>,
    pub rootfs: Option<String>,
    pub after: Vec<u64>,
    pub afterany: Vec<u64>,
    pub array: Option<Array>,
    pub isolate: Isolate,
    #[serde(default)]
    pub priority: i32,
    /// A copy job: the head-side file and where it goes on each node.
    #[serde(default)]
    pub copy: Option<Copy>,
    /// With `copy`: the relay tree's width (0: the default).
    #[serde(default)]
    pub fanout: u32,
}

/// `copy=SRC dest=DST`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Copy {
    pub src: String,
    pub dest: String,
}

/// Why a spec was refused, as a sentence naming the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(msg.into()))
}

/// Largest array accepted.
const MAX_ARRAY: usize = 100_000;

impl Spec {
    /// How many tasks an array job has (none for any other job).
    pub fn tasks(&self) -> u64 {
        self.array.as_ref().map_or(0, |a| a.indexes.len() as u64)
    }

    /// Parses a whole spec in any of its three forms.
    pub fn parse(data: &[u8]) -> Result<Spec, SpecError> {
        Spec::parse_with(data, false)?.check()
    }

    /// Checks the beginning of a spec still being written (several writes on one handle):
    /// every complete part must be valid but the command may not have come yet. With `cut`
    /// (the last write filled a writer's buffer) a last line, UTF-8 sequence or JSON text may
    /// also be cut short.
    pub fn parse_prefix(data: &[u8], cut: bool) -> Result<Spec, SpecError> {
        Spec::parse_with(data, cut)
    }

    fn parse_with(data: &[u8], prefix: bool) -> Result<Spec, SpecError> {
        if data.len() > MAX_SPEC {
            return err(format!("a job spec is at most {MAX_SPEC} bytes (got {})", data.len()));
        }
        let text = match std::str::from_utf8(data) {
            Ok(t) => t,
            Err(e) if prefix && e.error_len().is_none() => {
                std::str::from_utf8(&data[..e.valid_up_to()]).expect("valid up to there")
            }
            Err(_) => return err("the job spec is not valid UTF-8"),
        };
        if text.contains('\0') {
            return err("the job spec contains a NUL byte");
        }
        let trimmed = text.trim_start();
        if trimmed.starts_with('{') {
            return match Spec::from_json(trimmed) {
                Err(_) if prefix && serde_json::from_str::<serde_json::Value>(trimmed).is_err_and(|e| e.is_eof()) => {
                    Ok(Spec { cpus: 1, ..Spec::default() })
                }
                other => other,
            };
        }
        // A directive cut in the middle by the end of a write is judged when it is whole.
        let text = match text.rsplit_once('\n') {
            Some((whole, last)) if prefix && last.starts_with("#CLUSTER") => whole,
            None if prefix && text.starts_with("#CLUSTER") => "",
            _ => text,
        };
        let mut spec = Spec { cpus: 1, ..Spec::default() };
        let mut script = Vec::new();
        let mut in_header = true;
        for (n, line) in text.lines().enumerate() {
            if in_header {
                if n == 0 && line.starts_with("#!") {
                    script.push(line);
                    continue;
                }
                if let Some(rest) = line.strip_prefix("#CLUSTER") {
                    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
                        return err(format!("line {}: a directive is `#CLUSTER key=value ...`", n + 1));
                    }
                    let words = shlex::split(rest)
                        .ok_or_else(|| SpecError(format!("line {}: unbalanced quotes in the directive", n + 1)))?;
                    for word in words {
                        let (k, v) = word
                            .split_once('=')
                            .ok_or_else(|| SpecError(format!("line {}: {word:?} is not key=value", n + 1)))?;
                        spec.set(k, v)?;
                    }
                    continue;
                }
                in_header = false;
            }
            script.push(line);
        }
        spec.script = with_newline(script.join("\n"));
        Ok(spec)
    }

    fn from_json(text: &str) -> Result<Spec, SpecError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| SpecError(format!("the JSON spec does not parse: {e}")))?;
        let obj = value.as_object().ok_or_else(|| SpecError("a JSON spec is one object".into()))?;
        let mut spec = Spec { cpus: 1, ..Spec::default() };
        for (k, v) in obj {
            let text = |v: &serde_json::Value| match v {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Number(n) => Ok(n.to_string()),
                serde_json::Value::Array(a) => Ok(a
                    .iter()
                    .map(|x| x.as_u64().map(|n| n.to_string()).or_else(|| x.as_str().map(String::from)))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| SpecError(format!("{k}: a list of ids")))?
                    .join(",")),
                _ => err(format!("{k}: expected a string or a number")),
            };
            match k.as_str() {
                "cmd" | "script" => {
                    let script = v.as_str().ok_or_else(|| SpecError(format!("{k}: expected a string")))?;
                    spec.script = with_newline(script.to_string());
                }
                "env" => {
                    let env = v.as_object().ok_or_else(|| SpecError("env: expected an object".into()))?;
                    for (name, val) in env {
                        let val = val.as_str().ok_or_else(|| SpecError(format!("env.{name}: expected a string")))?;
                        spec.set(&format!("env.{name}"), val)?;
                    }
                }
                other => spec.set(other, &text(v)?)?,
            }
        }
        Ok(spec)
    }

    /// Sets one key from its text.
    fn set(&mut self, key: &str, value: &str) -> Result<(), SpecError> {
        let bad = |why: &str| SpecError(format!("{key}={value:?}: {why}"));
        match key {
            "name" => {
                if value.is_empty() || value.len() > 63 || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(bad("1-63 printable characters, no spaces"));
                }
                self.name = Some(value.to_string());
            }
            "nodes" => {
                self.nodes = match value.parse::<u32>() {
                    Ok(0) => return Err(bad("at least 1 node")),
                    Ok(n) => Nodes::Count(n),
                    Err(_) if value.is_empty() => return Err(bad("a count or a nodeset")),
                    Err(_) => {
                        // Checked for syntax now; groups are resolved by the head at submission.
                        if let Err(e) = crate::nodeset::NodeSet::parse_with(value, &|_: &str| Some("x".into()), 100_000)
                        {
                            return Err(bad(&e.to_string()));
                        }
                        Nodes::Set(value.to_string())
                    }
                }
            }
            "cpus" => self.cpus = value.parse().ok().filter(|n| (1..=1024).contains(n)).ok_or_else(|| bad("1-1024"))?,
            "mem" => {
                self.mem = Some(parse_size(value).filter(|&n| n > 0).ok_or_else(|| bad("a size like 512M or 2G"))?)
            }
            "timeout" => {
                self.timeout_s =
                    Some(parse_duration(value).filter(|&n| n > 0).ok_or_else(|| bad("seconds, or 90s, 10m, 2h, 1d"))?)
            }
            "cwd" => self.cwd = Some(abs_path(value).ok_or_else(|| bad("an absolute path"))?),
            "rootfs" => self.rootfs = Some(abs_path(value).ok_or_else(|| bad("an absolute path"))?),
            "after" => self.after = parse_ids(value).ok_or_else(|| bad("job ids like 41,42"))?,
            "afterany" => self.afterany = parse_ids(value).ok_or_else(|| bad("job ids like 41,42"))?,
            "array" => self.array = Some(parse_array(value).map_err(|e| bad(&e))?),
            "copy" => self.copy.get_or_insert_default().src = abs_path(value).ok_or_else(|| bad("an absolute path"))?,
            "dest" => {
                let dest = abs_path(value).filter(|d| !d.ends_with('/')).ok_or_else(|| bad("an absolute file path"))?;
                self.copy.get_or_insert_default().dest = dest;
            }
            "fanout" => self.fanout = value.parse().ok().filter(|n| (1..=64).contains(n)).ok_or_else(|| bad("1-64"))?,
            "priority" => {
                self.priority = value
                    .parse()
                    .ok()
                    .filter(|n: &i32| (-1000..=1000).contains(n))
                    .ok_or_else(|| bad("-1000 to 1000"))?
            }
            "isolate" => {
                self.isolate = match value {
                    "ns" => Isolate::Ns,
                    "none" => Isolate::None,
                    _ => return Err(bad("ns or none")),
                }
            }
            k if k.starts_with("env.") => {
                let name = &k[4..];
                let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && name.len() <= 128;
                if !valid {
                    return Err(bad("environment names are [A-Za-z_][A-Za-z0-9_]*"));
                }
                if name.starts_with("CLUSTER_") {
                    return Err(bad("CLUSTER_* variables are set by clusterfs"));
                }
                self.env.insert(name.to_string(), value.to_string());
            }
            other => {
                let keys: Vec<&str> = KEYS.iter().map(|k| k.0).collect();
                return err(format!("unknown key {other:?}; keys are: {}", keys.join(" ")));
            }
        }
        Ok(())
    }

    fn check(self) -> Result<Spec, SpecError> {
        match &self.copy {
            Some(c) if c.src.is_empty() => return err("dest needs copy=<file on the head>"),
            Some(c) if c.dest.is_empty() => return err("copy needs dest=<path on each node>"),
            Some(_) if !self.script.trim().is_empty() => return err("a copy job runs no script"),
            Some(_) if self.nodes == Nodes::Count(1) => return err("copy needs nodes=<nodeset, @group or count>"),
            Some(_) if self.array.is_some() => return err("copy and array cannot be combined"),
            Some(_) => return Ok(self),
            None if self.fanout > 0 => return err("fanout applies to copy jobs"),
            None if self.script.trim().is_empty() => return err("the job has no command"),
            None => {}
        }
        if self.rootfs.is_some() && self.isolate == Isolate::None {
            return err("rootfs needs isolate=ns (its own mount namespace)");
        }
        Ok(self)
    }
}

/// A script ends with a newline (an empty one stays empty).
fn with_newline(mut script: String) -> Arc<str> {
    if !script.is_empty() && !script.ends_with('\n') {
        script.push('\n');
    }
    script.into()
}

fn abs_path(v: &str) -> Option<String> {
    (v.starts_with('/') && v.len() < 4096 && !v.split('/').any(|c| c == "..")).then(|| v.to_string())
}

fn parse_ids(v: &str) -> Option<Vec<u64>> {
    let ids: Option<Vec<u64>> = v.split(',').map(|s| s.trim().parse().ok().filter(|&n| n > 0)).collect();
    ids.filter(|i| !i.is_empty() && i.len() <= 1000)
}

/// `512M`, `2G`, `1024`: bytes, with K/M/G/T as powers of 1024.
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mult) = match v.char_indices().last()? {
        (i, 'K' | 'k') => (&v[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&v[..i], 1 << 20),
        (i, 'G' | 'g') => (&v[..i], 1 << 30),
        (i, 'T' | 't') => (&v[..i], 1 << 40),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// `600`, `90s`, `10m`, `2h`, `1d`: seconds.
pub fn parse_duration(v: &str) -> Option<u64> {
    let (num, mult) = match v.char_indices().last()? {
        (i, 's') => (&v[..i], 1u64),
        (i, 'm') => (&v[..i], 60),
        (i, 'h') => (&v[..i], 3600),
        (i, 'd') => (&v[..i], 86400),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// `1-16%4`, `1,3,5-7`: indexes and the limit of tasks at once.
fn parse_array(v: &str) -> Result<Array, String> {
    let (list, limit) = match v.split_once('%') {
        Some((l, n)) => (l, n.parse::<u32>().ok().filter(|&n| n > 0).ok_or("the limit after % is a count")?),
        None => (v, 0),
    };
    let mut indexes = std::collections::BTreeSet::new();
    for part in list.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let (a, b): (u32, u32) =
            (a.parse().map_err(|_| "indexes like 1-16")?, b.parse().map_err(|_| "indexes like 1-16")?);
        if a > b {
            return Err(format!("range {part} goes backwards"));
        }
        if indexes.len() + (b - a) as usize + 1 > MAX_ARRAY {
            return Err(format!("at most {MAX_ARRAY} tasks"));
        }
        indexes.extend(a..=b);
    }
    Ok(Array { indexes: indexes.into_iter().collect(), limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line() {
        let s = Spec::parse(b"hostname; sleep 1\n").unwrap();
        assert_eq!(&*s.script, "hostname; sleep 1\n");
        assert_eq!((s.cpus, s.nodes.clone(), s.isolate), (1, Nodes::Count(1), Isolate::Ns));
    }

    #[test]
    fn directives_then_script() {
        let s = Spec::parse(b"#!/bin/bash\n#CLUSTER name=build cpus=2 mem=1G timeout=10m after=41\n#CLUSTER env.X=\"a b\"\ncd src && make\n# a comment\n").unwrap();
        assert_eq!(s.name.as_deref(), Some("build"));
        assert_eq!((s.cpus, s.mem, s.timeout_s), (2, Some(1 << 30), Some(600)));
        assert_eq!(s.after, vec![41]);
        assert_eq!(s.env["X"], "a b");
        assert_eq!(&*s.script, "#!/bin/bash\ncd src && make\n# a comment\n");
    }

    #[test]
    fn json() {
        let s = Spec::parse(br#"{"cmd":"./sim.sh","array":"1-16%4","env":{"A":"1"},"after":[3,4],"cpus":2}"#).unwrap();
        assert_eq!(s.array, Some(Array { indexes: (1..=16).collect(), limit: 4 }));
        assert_eq!((s.after.clone(), s.cpus, s.env["A"].as_str()), (vec![3, 4], 2, "1"));
    }

    #[test]
    fn each_bad_value_names_its_key() {
        for (spec, key) in [
            ("#CLUSTER cpus=0\nx", "cpus"),
            ("#CLUSTER cpus=lots\nx", "cpus"),
            ("#CLUSTER mem=lots\nx", "mem"),
            ("#CLUSTER mem=0\nx", "mem"),
            ("#CLUSTER timeout=-1\nx", "timeout"),
            ("#CLUSTER cwd=relative\nx", "cwd"),
            ("#CLUSTER rootfs=/a/../b\nx", "rootfs"),
            ("#CLUSTER after=x\nx", "after"),
            ("#CLUSTER array=5-1\nx", "array"),
            ("#CLUSTER array=1-4%0\nx", "array"),
            ("#CLUSTER isolate=vm\nx", "isolate"),
            ("#CLUSTER priority=1001\nx", "priority"),
            ("#CLUSTER priority=high\nx", "priority"),
            ("#CLUSTER nodes=cn[\nx", "nodes"),
            ("#CLUSTER nodes=0\nx", "nodes"),
            ("#CLUSTER env.1X=a\nx", "env.1X"),
            ("#CLUSTER name=a\x01b\nx", "name"),
            ("#CLUSTER bogus=1\nx", "bogus"),
            ("#CLUSTER cpus\nx", "cpus"),
            (r#"{"cmd":"x","cpus":"many"}"#, "cpus"),
            (r#"{"cmd":"x","nope":1}"#, "nope"),
        ] {
            let e = Spec::parse(spec.as_bytes()).unwrap_err().0;
            assert!(e.contains(key), "{spec:?}: {e}");
        }
        assert!(Spec::parse(b"#CLUSTER cpus=2\n").unwrap_err().0.contains("no command"));
        assert!(Spec::parse(b"\xff\xfe").is_err());
        assert!(Spec::parse(&vec![b'x'; MAX_SPEC + 1]).unwrap_err().0.contains("at most"));
        assert!(Spec::parse(b"[1,2]").is_ok(), "not JSON: a shell line starting with [");
        assert!(Spec::parse(b"{").is_err());
    }

    #[test]
    fn prefixes_of_a_spec_written_in_pieces() {
        assert!(Spec::parse_prefix(b"#CLUSTER cpus=2\n", false).is_ok(), "the command comes in the next write");
        assert!(Spec::parse_prefix(b"#CLUSTER cpus=2\n#CLUSTER ti", true).is_ok(), "a directive cut short");
        assert!(Spec::parse_prefix(b"{\"cmd\": \"tr", true).is_ok(), "JSON cut short");
        assert!(Spec::parse_prefix(b"{\"cmd\": \"tr", false).is_err(), "a small write is whole");
        assert!(Spec::parse_prefix(&[b'x', 0xe2, 0x82], true).is_ok(), "UTF-8 cut short");
        assert!(Spec::parse_prefix(b"#CLUSTER cpus=0\n", true).is_err(), "a whole bad directive is refused at once");
        assert!(Spec::parse_prefix(b"{\"cmd\": 1, \"x\": 2}", true).is_err());
        assert!(Spec::parse(b"#CLUSTER cpus=2\n").is_err());
    }
}
