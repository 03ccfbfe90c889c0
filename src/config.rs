//! The TOML configuration file; every key is documented in README.md, unknown keys are errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub head: HeadConfig,
    pub jobs: JobsConfig,
    pub images: ImagesConfig,
    pub hsm: HsmConfig,
    pub vms: VmsConfig,
}

/// `[vms]`: VMs run by the agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmsConfig {
    /// The template `mkdir vms/<name>` clones.
    pub default_template: String,
    /// qemu's accelerator: `kvm`, or `tcg` where KVM is absent.
    pub accel: String,
    /// The qemu binary on the nodes.
    pub qemu: String,
    /// Seconds an ACPI shutdown may take before the VM is destroyed.
    pub shutdown_timeout_s: u64,
    /// The VM network, e.g. `10.77.0.0/24` (first address: the bridge); unset: no network.
    pub subnet: Option<String>,
    /// The bridge each node makes for its VMs.
    pub bridge: String,
    /// An interface each node adds to the bridge, so VMs of several nodes share one segment.
    pub uplink: Option<String>,
    /// The most of a VM's console the head keeps: past it, the oldest half goes. 0: no limit.
    pub console_max: Bytes,
}

impl Default for VmsConfig {
    fn default() -> VmsConfig {
        VmsConfig {
            default_template: "default".into(),
            accel: "kvm".into(),
            qemu: "qemu-system-x86_64".into(),
            shutdown_timeout_s: 60,
            subnet: None,
            bridge: "cfbr0".into(),
            uplink: None,
            console_max: Bytes(8 << 20),
        }
    }
}

/// `[hsm]`: the HSM coordinator. Keys keep coordinatool's names and meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HsmConfig {
    /// `"<tag> <mover> [<mover>...]"`: archives whose data holds `<tag>` go to those movers.
    pub archive_on_hosts: Vec<String>,
    /// `"<tag> <hash_count> <mover>..."`: the value after `<tag>` picks one mover by consistent hashing.
    pub archive_on_hosts_ch: Vec<String>,
    /// `[<idle>, <max>]` seconds: a mover's batching slot keeps its archive tag until idle that
    /// long, or at most `max` (0: no limit). Unset: no batching.
    pub batch_archives_slices_sec: Option<Vec<u64>>,
    /// Archive tags a mover takes at once when batching.
    pub batch_archives_slots_per_client: u32,
    /// `cr`: requests whose data holds `cr=<hint>` are reported in `hsm/<hint>`.
    pub reporting_hint: Option<String>,
    /// How often waiting and running requests report progress lines.
    pub reporting_schedule_interval_ms: u64,
    /// How long a disconnected mover keeps its requests before they are queued again.
    pub client_grace_ms: u64,
    /// Among queued requests of one action, serve the owner (uid) with the fewest running first.
    pub fair_share: bool,
}

impl Default for HsmConfig {
    fn default() -> HsmConfig {
        HsmConfig {
            archive_on_hosts: Vec::new(),
            archive_on_hosts_ch: Vec::new(),
            batch_archives_slices_sec: None,
            batch_archives_slots_per_client: 1,
            reporting_hint: None,
            reporting_schedule_interval_ms: 60_000,
            client_grace_ms: 600_000,
            fair_share: false,
        }
    }
}

/// `[images]`: per-user raw disk images on shared volumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Volumes by name: directories the head and every node see at the same path.
    pub volumes: BTreeMap<String, VolumeConfig>,
    /// Size of an image made without `size=`.
    pub default_size: Bytes,
    /// Filesystem made in new images (only `ext4` is supported).
    pub fs_type: String,
    /// Where a node mounts an image: `<mount_root>/<user>`.
    pub mount_root: PathBuf,
    /// Directory of template images, `<name>.img`, that `template=<name>` starts from.
    pub template_dir: Option<PathBuf>,
    /// Teams for `bill`: team name -> its users.
    pub teams: BTreeMap<String, Vec<String>>,
    /// Formatted images of `default_size` kept ready on each volume, so `mkdir` is instant.
    pub spares: u32,
    /// Seconds between health scans of the nodes' loop devices and mounts (and spare refills).
    pub health_interval_s: u64,
}

/// One volume of `[images.volumes]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub path: PathBuf,
    /// Quota capacity: the most the images placed here may add up to.
    pub capacity: Bytes,
}

impl Default for ImagesConfig {
    fn default() -> ImagesConfig {
        ImagesConfig {
            volumes: BTreeMap::new(),
            default_size: Bytes(50 << 30),
            fs_type: "ext4".into(),
            mount_root: PathBuf::from("/mnt/clusterfs"),
            template_dir: None,
            teams: BTreeMap::new(),
            spares: 1,
            health_interval_s: 10,
        }
    }
}

/// A byte count written as `512M`, `50G`, `10T` or a plain number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Number(u64),
            Text(String),
        }
        match Text::deserialize(d)? {
            Text::Number(n) => Ok(Bytes(n)),
            Text::Text(t) => crate::jobs::spec::parse_size(&t)
                .map(Bytes)
                .ok_or_else(|| serde::de::Error::custom(format!("{t:?} is not a size like 512M, 50G or 10T"))),
        }
    }
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
    /// The most of each stream (stdout, stderr) of a run the head keeps: a run that writes more
    /// is killed, the rest dropped, so that no job fills the head's disk. 0: no limit.
    pub max_output: Bytes,
}

impl Default for JobsConfig {
    fn default() -> JobsConfig {
        JobsConfig {
            allow_root: true,
            retention_s: 7 * 86400,
            lost_after_s: 300,
            release_after_ms: 1000,
            max_output: Bytes(1 << 30),
        }
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
    /// The store: empty for the embedded one in `state_dir`, or
    /// `etcd://host:port[,host:port...][/prefix]` for a store several heads share.
    pub store: String,
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
    /// Mount the tree on a small loop device made in the state directory (`fuseblk`), so its
    /// device number and UUID, and with them an NFS re-export's file handles, are the same
    /// after a restart. Without it, or without loop devices, the mount is plain `fuse`.
    pub stable_mount: bool,
    /// This head's name among the heads of a cluster [default: the host's short name].
    pub name: String,
    /// Where other heads and agents reach this head, HOST:PORT [default: the listen address,
    /// with this host's name for a wildcard address].
    pub advertise: String,
    /// With an etcd store: seconds a leading head's lease lasts without renewal, so how soon
    /// another head takes over after it dies.
    pub lease_ttl_s: u64,
    /// With an etcd store: every this many seconds the leading head compacts etcd's history
    /// up to where it stood the last time (etcd keeps every old version of a key until then,
    /// and refuses writes once its space quota is full); 0 leaves that to etcd's own
    /// `--auto-compaction-retention`.
    pub etcd_compact_s: u64,
    /// Where job output, HSM reports and VM consoles are spooled [default: the state
    /// directory]. With several heads, a directory every head mounts (NFS, Lustre), so the
    /// head that takes over has what the last one wrote.
    pub shared_dir: PathBuf,
}

impl Default for HeadConfig {
    fn default() -> HeadConfig {
        HeadConfig {
            listen: "127.0.0.1:7070".into(),
            state_dir: PathBuf::from("/var/lib/clusterfs"),
            store: String::new(),
            interval_ms: 1000,
            missed_intervals: 3,
            fuse_threads: 4,
            max_frame: crate::proto::DEFAULT_MAX_FRAME,
            nodeset_limit: crate::nodeset::DEFAULT_LIMIT,
            ping_timeout_ms: 2000,
            stable_mount: true,
            name: String::new(),
            advertise: String::new(),
            lease_ttl_s: 3,
            etcd_compact_s: 300,
            shared_dir: PathBuf::new(),
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
        if !h.shared_dir.as_os_str().is_empty() && !h.shared_dir.is_absolute() {
            return Err("head.shared_dir must be an absolute path".into());
        }
        if !(1..=600).contains(&h.lease_ttl_s) {
            return Err("head.lease_ttl_s must be between 1 and 600".into());
        }
        if h.etcd_compact_s > 86_400 {
            return Err("head.etcd_compact_s must be at most 86400 (a day), or 0 to leave compaction to etcd".into());
        }
        if !h.name.is_empty() {
            crate::names::check("head", &h.name).map_err(|e| format!("head.name: {e}"))?;
        }
        let i = &self.images;
        if i.fs_type != "ext4" {
            return Err(format!("images.fs_type {:?} is not supported: use ext4", i.fs_type));
        }
        if i.default_size.0 < crate::images::MIN_SIZE {
            return Err("images.default_size must be at least 16M".into());
        }
        if !i.mount_root.is_absolute() {
            return Err("images.mount_root must be an absolute path".into());
        }
        if i.health_interval_s == 0 {
            return Err("images.health_interval_s must be at least 1".into());
        }
        let v = &self.vms;
        if !matches!(v.accel.as_str(), "kvm" | "tcg") {
            return Err(format!("vms.accel {:?} is not kvm or tcg", v.accel));
        }
        if let Some(s) = &v.subnet {
            crate::vms::parse_subnet(s).map_err(|e| format!("vms.subnet: {e}"))?;
        }
        if v.bridge.is_empty() || v.bridge.len() > 15 {
            return Err("vms.bridge must be an interface name of 1-15 bytes".into());
        }
        let m = &self.hsm;
        if m.reporting_schedule_interval_ms < 10 {
            return Err("hsm.reporting_schedule_interval_ms must be at least 10".into());
        }
        if let Some(hint) = &m.reporting_hint
            && (hint.is_empty() || hint.contains(['=', ',', ' ']))
        {
            return Err(format!("hsm.reporting_hint {hint:?} must be a word like cr"));
        }
        for (name, v) in &i.volumes {
            crate::names::check("volume", name).map_err(|e| format!("images.volumes: {e}"))?;
            if !v.path.is_absolute() {
                return Err(format!("images.volumes.{name}.path must be an absolute path"));
            }
            if v.capacity.0 == 0 {
                return Err(format!("images.volumes.{name}.capacity must be above 0"));
            }
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

    #[test]
    fn images_take_sizes_as_text() {
        let c = Config::from_toml(
            "[images]\ndefault_size = \"10G\"\nmount_root = \"/home\"\n\
             [images.volumes.vol01]\npath = \"/srv/vol01\"\ncapacity = \"2T\"\n\
             [images.teams]\nphysics = [\"alice\", \"bob\"]\n",
        )
        .unwrap();
        assert_eq!(c.images.default_size, Bytes(10 << 30));
        assert_eq!(c.images.volumes["vol01"].capacity, Bytes(2 << 40));
        assert_eq!(c.images.teams["physics"], ["alice", "bob"]);
        assert!(Config::from_toml("[images]\ndefault_size = \"ten\"\n").unwrap_err().contains("not a size"));
        assert!(Config::from_toml("[images]\nfs_type = \"xfs\"\n").unwrap_err().contains("not supported"));
        assert!(Config::from_toml("[images.volumes.new]\npath = \"/a\"\ncapacity = 1\n").is_err());
        assert_eq!(Config::from_toml("[head]\netcd_compact_s = 0\n").unwrap().head.etcd_compact_s, 0);
        assert!(Config::from_toml("[head]\netcd_compact_s = 86401\n").unwrap_err().contains("at most 86400"));
    }
}
