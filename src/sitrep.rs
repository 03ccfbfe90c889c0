//! A node's situation report: what the agent measures, and the three ways the head prints it.
//!
//! One table ([`Sitrep::fields`]) gives the keys in their fixed order; `sitrep`,
//! `sitrep.json` and `metrics` are all rendered from it, so they cannot disagree.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// What an agent measures each interval (from procfs; no tool is spawned).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub uptime_s: f64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub cpus: u64,
    /// Average clock of the CPUs in MHz, for `perf_score`.
    pub cpu_mhz: f64,
    pub cpu_pct: f64,
    pub iowait_pct: f64,
    pub mem_total: u64,
    pub mem_avail: u64,
    pub swap_total: u64,
    pub swap_used: u64,
    pub disk_read_bps: f64,
    pub disk_write_bps: f64,
    pub net_rx_bps: f64,
    pub net_tx_bps: f64,
    pub procs_running: u64,
    pub users: u64,
    pub jobs: u64,
    pub agent_version: String,
}

impl Report {
    /// Capacity in GHz-cores: `cpus * cpu_mhz / 1000` (1 GHz assumed when the clock is unknown).
    pub fn perf_score(&self) -> f64 {
        let mhz = if self.cpu_mhz > 0.0 { self.cpu_mhz } else { 1000.0 };
        (self.cpus.max(1) as f64) * mhz / 1000.0
    }

    /// Load per capacity, lower is better:
    /// `100 * (load1 + cpus * iowait_pct / 100 + 0.25 * users) / perf_score`.
    pub fn load_index(&self) -> f64 {
        let demand = self.load1 + self.cpus as f64 * self.iowait_pct / 100.0 + 0.25 * self.users as f64;
        100.0 * demand / self.perf_score()
    }
}

/// A value in a sitrep line.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Int(u64),
    Num(f64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Text(s) => f.write_str(s),
            Value::Int(n) => write!(f, "{n}"),
            Value::Num(x) => write!(f, "{}", round2(*x)),
        }
    }
}

fn round2(x: f64) -> f64 {
    if x.is_finite() { (x * 100.0).round() / 100.0 } else { 0.0 }
}

/// A sitrep as the head shows it: the agent's report plus what only the head knows.
#[derive(Debug, Clone)]
pub struct Sitrep<'a> {
    pub name: &'a str,
    pub state: &'a str,
    pub age_s: f64,
    pub report: &'a Report,
}

/// (key, help) for every key, in the fixed order of DESIGN.md.
pub const KEYS: [(&str, &str); 24] = [
    ("name", "node name"),
    ("state", "up, down or drained"),
    ("age_s", "seconds since the last report"),
    ("uptime_s", "seconds since boot"),
    ("load1", "1-minute load average"),
    ("load5", "5-minute load average"),
    ("load15", "15-minute load average"),
    ("cpus", "online CPUs"),
    ("cpu_pct", "CPU busy percent over the last interval"),
    ("iowait_pct", "CPU iowait percent over the last interval"),
    ("mem_total", "memory in bytes"),
    ("mem_avail", "available memory in bytes"),
    ("swap_total", "swap in bytes"),
    ("swap_used", "swap used in bytes"),
    ("disk_read_bps", "disk bytes read per second"),
    ("disk_write_bps", "disk bytes written per second"),
    ("net_rx_bps", "network bytes received per second"),
    ("net_tx_bps", "network bytes sent per second"),
    ("procs_running", "runnable processes"),
    ("users", "login sessions"),
    ("jobs", "clusterfs jobs running"),
    ("perf_score", "capacity in GHz-cores"),
    ("load_index", "load per capacity, lower is better"),
    ("agent_version", "clusterfs-agent version"),
];

impl Sitrep<'_> {
    /// Every (key, value) in the fixed order.
    pub fn fields(&self) -> Vec<(&'static str, Value)> {
        let r = self.report;
        let values = [
            Value::Text(self.name.to_string()),
            Value::Text(self.state.to_string()),
            Value::Num(self.age_s),
            Value::Num(r.uptime_s),
            Value::Num(r.load1),
            Value::Num(r.load5),
            Value::Num(r.load15),
            Value::Int(r.cpus),
            Value::Num(r.cpu_pct),
            Value::Num(r.iowait_pct),
            Value::Int(r.mem_total),
            Value::Int(r.mem_avail),
            Value::Int(r.swap_total),
            Value::Int(r.swap_used),
            Value::Num(r.disk_read_bps),
            Value::Num(r.disk_write_bps),
            Value::Num(r.net_rx_bps),
            Value::Num(r.net_tx_bps),
            Value::Int(r.procs_running),
            Value::Int(r.users),
            Value::Int(r.jobs),
            Value::Num(r.perf_score()),
            Value::Num(r.load_index()),
            Value::Text(if r.agent_version.is_empty() { "-".into() } else { r.agent_version.clone() }),
        ];
        KEYS.iter().map(|(k, _)| *k).zip(values).collect()
    }

    /// `key value` lines.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(512);
        for (k, v) in self.fields() {
            let _ = writeln!(out, "{k} {v}");
        }
        out
    }

    /// One JSON object with the same keys in the same order, and a newline.
    pub fn json(&self) -> String {
        let mut map = serde_json::Map::new();
        for (k, v) in self.fields() {
            let v = match v {
                Value::Text(s) => serde_json::Value::String(s),
                Value::Int(n) => n.into(),
                Value::Num(x) => serde_json::Number::from_f64(round2(x)).map_or(serde_json::Value::Null, Into::into),
            };
            map.insert(k.to_string(), v);
        }
        let mut s = serde_json::Value::Object(map).to_string();
        s.push('\n');
        s
    }

    /// Prometheus text exposition; every sample is labelled `node="<name>"`.
    pub fn metrics(&self) -> String {
        let mut out = String::with_capacity(2048);
        let node = escape_label(self.name);
        for ((k, v), (_, help)) in self.fields().into_iter().zip(KEYS) {
            match (k, v) {
                ("name", _) => {}
                ("state", Value::Text(state)) => {
                    let _ = writeln!(out, "# HELP clusterfs_node_state {help}");
                    let _ = writeln!(out, "# TYPE clusterfs_node_state gauge");
                    for s in ["up", "down", "drained"] {
                        let on = u8::from(state.split(' ').next() == Some(s));
                        let _ = writeln!(out, "clusterfs_node_state{{node=\"{node}\",state=\"{s}\"}} {on}");
                    }
                }
                ("agent_version", Value::Text(v)) => {
                    let _ = writeln!(out, "# HELP clusterfs_agent_info {help}");
                    let _ = writeln!(out, "# TYPE clusterfs_agent_info gauge");
                    let _ = writeln!(out, "clusterfs_agent_info{{node=\"{node}\",version=\"{}\"}} 1", escape_label(&v));
                }
                (k, v) => {
                    let _ = writeln!(out, "# HELP clusterfs_{k} {help}");
                    let _ = writeln!(out, "# TYPE clusterfs_{k} gauge");
                    let _ = writeln!(out, "clusterfs_{k}{{node=\"{node}\"}} {v}");
                }
            }
        }
        out
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_renderings_share_keys_and_order() {
        let report = Report {
            cpus: 4,
            cpu_mhz: 2500.0,
            load1: 1.0,
            users: 2,
            agent_version: "0.1.0".into(),
            ..Report::default()
        };
        let s = Sitrep { name: "cn1", state: "up", age_s: 0.25, report: &report };
        let text = s.text();
        let keys: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(keys, KEYS.iter().map(|k| k.0).collect::<Vec<_>>());
        assert!(text.contains("perf_score 10\n"));
        assert!(text.contains("load_index 15\n"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&s.json()).unwrap();
        assert_eq!(json.as_object().unwrap().keys().cloned().collect::<Vec<_>>(), keys);
        let m = s.metrics();
        assert!(m.contains("clusterfs_load1{node=\"cn1\"} 1\n"));
        assert!(m.lines().filter(|l| !l.starts_with('#')).all(|l| l.contains("node=\"cn1\"")));
    }
}
