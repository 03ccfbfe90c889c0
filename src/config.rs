//! The TOML configuration file; every key is documented in README.md, unknown keys are errors.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub head: HeadConfig,
    pub jobs: JobsConfig,
}

/// `[jobs]`: submission and the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Whether root (on the head) may submit jobs that run as root.
    pub allow_root: bool,
    /// Seconds an ended job stays listed before it and its output are removed.
    pub retention_s: u64,
    /// Seconds a node may stay down before its running jobs are declared lost.
    pub lost_after_s: u64,
    /// A `jobs/new` writer that neither writes nor closes for this long has finished its spec.
    pub release_after_ms: u64,
}

impl Default for JobsConfig {
    fn default() -> JobsConfig {
        JobsConfig { allow_root: true, retention_s: 7 * 86400, lost_after_s: 300, release_after_ms: 1000 }
    }
}

/// `[head]`: the head daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadConfig {
    /// Address agents dial.
    pub listen: String,
    /// Where the store, the secret and spools live.
    pub state_dir: PathBuf,
    /// How often agents report, in milliseconds.
    pub interval_ms: u64,
    /// Missed reports before a node is down.
    pub missed_intervals: u32,
    /// FUSE threads.
    pub fuse_threads: usize,
    /// Largest frame accepted from an agent, in bytes.
    pub max_frame: usize,
    /// Largest nodeset accepted anywhere.
    pub nodeset_limit: usize,
    /// How long a `ping` read waits for the agent, in milliseconds.
    pub ping_timeout_ms: u64,
}

impl Default for HeadConfig {
    fn default() -> HeadConfig {
        HeadConfig {
            listen: "127.0.0.1:7070".into(),
            state_dir: PathBuf::from("/var/lib/clusterfs"),
            interval_ms: 1000,
            missed_intervals: 3,
            fuse_threads: 4,
            max_frame: crate::proto::DEFAULT_MAX_FRAME,
            nodeset_limit: crate::nodeset::DEFAULT_LIMIT,
            ping_timeout_ms: 2000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config {path}: {source}")]
    Parse { path: String, source: Box<toml::de::Error> },
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// Reads `path`, or the defaults when there is none.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else { return Ok(Config::default()) };
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        let cfg: Config =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: p.clone(), source: Box::new(e) })?;
        cfg.validate().map_err(|message| ConfigError::Invalid { path: p, message })?;
        Ok(cfg)
    }

    /// Parses and checks configuration text; the error is a sentence.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        let h = &self.head;
        if h.interval_ms < 10 {
            return Err("head.interval_ms must be at least 10".into());
        }
        if h.missed_intervals == 0 {
            return Err("head.missed_intervals must be at least 1".into());
        }
        if h.fuse_threads == 0 || h.fuse_threads > 64 {
            return Err("head.fuse_threads must be between 1 and 64".into());
        }
        if h.max_frame < 4096 {
            return Err("head.max_frame must be at least 4096".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("[head]\nlisten = \"0.0.0.0:1\"\n").is_ok());
        assert!(toml::from_str::<Config>("[head]\nlisten_typo = 1\n").is_err());
        assert!(toml::from_str::<Config>("[nope]\n").is_err());
    }
}
