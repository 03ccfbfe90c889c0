//! VMs as head and agents share them: templates, specs, what an agent needs to run one, addresses from names.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Bytes;

/// Smallest and largest memory a VM may have.
pub const MIN_MEM: u64 = 16 << 20;
pub const MAX_MEM: u64 = 1 << 40;
/// Most virtual CPUs a VM may have.
pub const MAX_CPUS: u32 = 256;
/// Bulk streams of VM consoles carry this bit, then the VM's id.
pub const CONSOLE_STREAM: u64 = 1 << 63;

/// A base image VMs are cloned from (`vms/templates/<name>`, written by root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// The disk image, at a path every node sees; never written by its clones.
    pub disk: PathBuf,
    /// Its format (`qcow2` or `raw`).
    #[serde(default = "qcow2")]
    pub format: String,
    /// Direct boot: kernel, initrd and command line.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub append: Option<String>,
    /// Defaults for its clones.
    #[serde(default = "default_mem")]
    pub mem: Bytes,
    #[serde(default = "one")]
    pub cpus: u32,
    /// `qemu` (the agent runs qemu itself) or `libvirt` (through virsh on the node).
    #[serde(default = "qemu")]
    pub backend: String,
}

fn qemu() -> String {
    "qemu".into()
}

fn qcow2() -> String {
    "qcow2".into()
}

fn default_mem() -> Bytes {
    Bytes(512 << 20)
}

fn one() -> u32 {
    1
}

/// Whether a VM is started again when it dies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Restart {
    #[default]
    Never,
    Always,
}

/// What `vms/new` takes (and `mkdir` makes with the default template).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub mem: Option<Bytes>,
    #[serde(default)]
    pub cpus: Option<u32>,
    /// A data disk of its own, of this size.
    #[serde(default)]
    pub data_disk: Option<Bytes>,
    /// Run it on this node.
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub restart: Restart,
    /// Appended to the template's kernel command line.
    #[serde(default)]
    pub append: Option<String>,
}

/// Parses and checks a `vms/new` spec; the error is a sentence naming the bad key.
pub fn parse_spec(text: &str) -> Result<VmSpec, String> {
    let spec: VmSpec = serde_json::from_str(text.trim()).map_err(|e| format!("the VM spec: {e}"))?;
    check_spec(&spec)?;
    Ok(spec)
}

pub fn check_spec(spec: &VmSpec) -> Result<(), String> {
    crate::names::check("VM", &spec.name)?;
    if let Some(Bytes(m)) = spec.mem
        && !(MIN_MEM..=MAX_MEM).contains(&m)
    {
        return Err(format!("mem must be between 16M and 1T (got {m} bytes)"));
    }
    if let Some(c) = spec.cpus
        && !(1..=MAX_CPUS).contains(&c)
    {
        return Err(format!("cpus must be between 1 and {MAX_CPUS} (got {c})"));
    }
    if spec.data_disk.is_some_and(|Bytes(d)| !(1 << 20..=1 << 50).contains(&d)) {
        return Err("data_disk must be between 1M and 1P".into());
    }
    if spec.append.as_ref().is_some_and(|a| a.len() > 1024 || a.contains(['\n', '\0'])) {
        return Err("append is one line of at most 1024 bytes".into());
    }
    Ok(())
}

/// Parses and checks a template written into `vms/templates/<name>`.
pub fn parse_template(text: &str) -> Result<Template, String> {
    let t: Template = serde_json::from_str(text.trim()).map_err(|e| format!("the template: {e}"))?;
    if !t.disk.is_absolute() {
        return Err("disk must be an absolute path".into());
    }
    if !matches!(t.format.as_str(), "qcow2" | "raw") {
        return Err(format!("format {:?} is not qcow2 or raw", t.format));
    }
    if !matches!(t.backend.as_str(), "qemu" | "libvirt") {
        return Err(format!("backend {:?} is not qemu or libvirt", t.backend));
    }
    if t.initrd.is_some() && t.kernel.is_none() {
        return Err("an initrd needs a kernel".into());
    }
    if !(MIN_MEM..=MAX_MEM).contains(&t.mem.0) || !(1..=MAX_CPUS).contains(&t.cpus) {
        return Err("mem must be 16M-1T and cpus 1-256".into());
    }
    Ok(t)
}

/// The guest network of a VM: its address and the bridge it hangs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Net {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    pub ip: Ipv4Addr,
    /// An interface the bridge joins, so VMs of several nodes share one segment.
    pub uplink: Option<String>,
}

/// Everything an agent needs to make and run one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    pub id: u64,
    pub name: String,
    pub template: Template,
    pub mem: u64,
    pub cpus: u32,
    pub data_disk: Option<u64>,
    pub append: Option<String>,
    pub mac: String,
    pub net: Option<Net>,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub qemu: String,
}

/// Where a VM stands on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub id: u64,
    pub name: String,
    pub running: bool,
    /// It stopped without being asked to.
    pub crashed: bool,
    pub console_len: u64,
}

fn digest(name: &str) -> [u8; 32] {
    Sha256::digest(name.as_bytes()).into()
}

/// A stable, locally administered MAC from the VM name (qemu's 52:54:00 prefix).
pub fn mac(name: &str) -> String {
    let d = digest(name);
    format!("52:54:00:{:02x}:{:02x}:{:02x}", d[0], d[1], d[2])
}

/// The tap device of a VM on its node: `cfv` and a hash of its name (at most 15 bytes).
pub fn tap_name(name: &str) -> String {
    format!("cfv{}", &mac(name).replace(':', "")[6..])
}

/// A stable address in `subnet/prefix` from the VM name, avoiding the network, the gateway
/// (first address) and broadcast.
pub fn ip(name: &str, subnet: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let hosts = 1u64 << (32 - u32::from(prefix.clamp(8, 30)));
    let d = digest(name);
    let h = u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) % (hosts - 3) + 2;
    Ipv4Addr::from(u32::from(subnet) & !((hosts - 1) as u32) | h as u32)
}

/// `10.77.0.0/24` into its address and prefix.
pub fn parse_subnet(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, p) = text.split_once('/').ok_or_else(|| format!("{text:?} is not a subnet like 10.77.0.0/24"))?;
    let addr: Ipv4Addr = a.parse().map_err(|_| format!("{a:?} is not an IPv4 address"))?;
    let prefix: u8 = p.parse().ok().filter(|p| (8..=30).contains(p)).ok_or("the prefix must be 8 to 30")?;
    Ok((addr, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_values_are_named() {
        let s = parse_spec(r#"{"name":"xyzzy3","template":"debian","mem":"2G","cpus":2,"data_disk":"20G"}"#).unwrap();
        assert_eq!((s.mem, s.cpus, s.data_disk), (Some(Bytes(2 << 30)), Some(2), Some(Bytes(20 << 30))));
        assert!(parse_spec(r#"{"name":"a","mem":"lots"}"#).unwrap_err().contains("not a size"));
        assert!(parse_spec(r#"{"name":"a","cpus":0}"#).unwrap_err().contains("cpus"));
        assert!(parse_spec(r#"{"name":"a/b"}"#).is_err());
        assert!(parse_spec(r#"{"name":"a","colour":1}"#).unwrap_err().contains("colour"));
        assert!(parse_template(r#"{"disk":"rel.qcow2"}"#).unwrap_err().contains("absolute"));
        let t = parse_template(r#"{"disk":"/t/base.qcow2","kernel":"/boot/vmlinuz","mem":"256M"}"#).unwrap();
        assert_eq!((t.mem, t.cpus, t.format.as_str()), (Bytes(256 << 20), 1, "qcow2"));
    }

    #[test]
    fn addresses_are_stable_and_inside_the_subnet() {
        let (net, prefix) = parse_subnet("10.77.0.0/24").unwrap();
        for n in ["a", "xyzzy2", "vm-17"] {
            let ip = ip(n, net, prefix);
            assert_eq!(ip, super::ip(n, net, prefix));
            let o = ip.octets();
            assert_eq!(&o[..3], &[10, 77, 0]);
            assert!((2..=254).contains(&o[3]), "{ip}");
            assert_eq!(mac(n), mac(n));
            assert!(mac(n).starts_with("52:54:00:"));
        }
        assert_ne!(mac("a"), mac("b"));
        assert!(parse_subnet("10.0.0.0/31").is_err());
    }
}
