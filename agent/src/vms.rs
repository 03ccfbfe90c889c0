//! The qemu backend: linked-clone overlays, qemu processes that outlive the agent, QMP, consoles, the VM bridge.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use clusterfs::vms::{Launch, Net, VmStatus, tap_name};
use tracing::{info, warn};

/// One node name's VMs, each in `<root>/<name>/`.
#[derive(Debug)]
pub struct Vms {
    root: PathBuf,
    /// Serializes bridge and dnsmasq setup between VMs.
    net: Mutex<()>,
}

/// What a VM is asked to do through QMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Powerdown,
    Quit,
    Reset,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{} failed: {}", cmd.get_program().to_string_lossy(), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A QMP session on a VM's socket.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(sock: &Path) -> std::io::Result<Qmp> {
        let s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut q = Qmp { reader: BufReader::new(s.try_clone()?), writer: s };
        q.line()?; // the greeting
        q.execute("qmp_capabilities")?;
        Ok(q)
    }

    fn line(&mut self) -> std::io::Result<serde_json::Value> {
        let mut l = String::new();
        if self.reader.read_line(&mut l)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "QMP closed"));
        }
        serde_json::from_str(&l).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Runs a command; events that come first are skipped.
    fn execute(&mut self, cmd: &str) -> std::io::Result<serde_json::Value> {
        writeln!(self.writer, "{}", serde_json::json!({ "execute": cmd }))?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(std::io::Error::other(format!("QMP {cmd}: {e}")));
            }
        }
    }
}

impl Vms {
    pub fn new(root: PathBuf) -> Vms {
        Vms { root, net: Mutex::new(()) }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn launch(&self, name: &str) -> Result<Launch, String> {
        let text = std::fs::read(self.dir(name).join("launch.json")).map_err(|e| format!("VM {name}: {e}"))?;
        serde_json::from_slice(&text).map_err(|e| format!("VM {name}: launch.json: {e}"))
    }

    /// The qemu process of `name`, when it runs.
    fn pid(&self, name: &str) -> Option<i32> {
        let mine = self.dir(name).join("pid");
        let file = if mine.exists() { mine } else { PathBuf::from(format!("/run/libvirt/qemu/{}.pid", domain(name))) };
        let pid: i32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let wants = [format!("guest={name},"), format!("guest={},", domain(name))];
        cmdline.split(|b| *b == 0).any(|a| wants.iter().any(|w| a.starts_with(w.as_bytes()))).then_some(pid)
    }

    fn libvirt(&self, name: &str) -> bool {
        self.launch(name).is_ok_and(|l| l.template.backend == "libvirt")
    }

    /// Makes the clone: a qcow2 overlay on the template and, when asked, a data disk. Nothing
    /// is left behind when a step fails; a clone made before is kept.
    pub fn create(&self, launch: &Launch) -> Result<(), String> {
        let dir = self.dir(&launch.name);
        if dir.join("launch.json").exists() {
            return Ok(());
        }
        let t = &launch.template;
        if !t.disk.exists() {
            return Err(format!("the template disk {} does not exist on this node", t.disk.display()));
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let made = (|| {
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", &t.format, "-b"])
                .arg(&t.disk)
                .arg(dir.join("disk.qcow2")))?;
            if let Some(size) = launch.data_disk {
                run(Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(dir.join("data.qcow2"))
                    .arg(size.to_string()))?;
            }
            let json = serde_json::to_vec_pretty(launch).map_err(|e| e.to_string())?;
            std::fs::write(dir.join("launch.json"), json).map_err(|e| format!("launch.json: {e}"))
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        made
    }

    /// Starts the VM's qemu (daemonized: it outlives the agent). Running already: nothing.
    pub fn start(&self, name: &str) -> Result<(), String> {
        if self.pid(name).is_some() {
            return Ok(());
        }
        let l = self.launch(name)?;
        accel_check(&l.accel, Path::new("/dev/kvm"))?;
        let dir = self.dir(name);
        if l.template.backend == "libvirt" {
            return self.start_libvirt(&l);
        }
        let tap = match &l.net {
            Some(net) => {
                self.bridge(&l, net)?;
                Some(self.tap(&l.name, &net.bridge)?)
            }
            None => None,
        };
        // A qemu just killed may still hold its pid file's lock: it left /proc's cmdline (so
        // it counts as stopped) a moment before its files close, and a new qemu refuses to
        // start while the lock is held ("Cannot lock pid file").
        wait_unlocked(&dir.join("pid"), Duration::from_secs(10));
        let _ = std::fs::remove_file(dir.join("qmp.sock"));
        let mut cmd = Command::new(&l.qemu);
        cmd.arg("-name")
            .arg(format!("guest={name},debug-threads=on"))
            .args(["-accel", &l.accel, "-m", &format!("{}M", l.mem >> 20), "-smp", &l.cpus.to_string()])
            .args(["-display", "none", "-nodefaults", "-no-user-config"])
            .arg("-chardev")
            .arg(format!("file,id=console,path={},append=on", dir.join("console").display()))
            .args(["-serial", "chardev:console"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()))
            .arg("-pidfile")
            .arg(dir.join("pid"))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2", dir.join("disk.qcow2").display()));
        if l.data_disk.is_some() {
            cmd.arg("-drive").arg(format!("file={},if=virtio,format=qcow2", dir.join("data.qcow2").display()));
        }
        if let Some(k) = &l.template.kernel {
            cmd.arg("-kernel").arg(k);
            if let Some(i) = &l.template.initrd {
                cmd.arg("-initrd").arg(i);
            }
            let append = [l.template.append.as_deref(), l.append.as_deref()].into_iter().flatten().collect::<Vec<_>>();
            cmd.arg("-append").arg(append.join(" "));
        }
        match &tap {
            Some(tap) => cmd
                .arg("-netdev")
                .arg(format!("tap,id=net0,ifname={tap},script=no,downscript=no"))
                .arg("-device")
                .arg(format!("virtio-net-pci,netdev=net0,mac={}", l.mac)),
            None => cmd.args(["-nic", "none"]),
        };
        cmd.arg("-daemonize");
        run(&mut cmd).map_err(|e| format!("starting qemu: {e}"))?;
        let _ = std::fs::remove_file(dir.join("stopped"));
        std::fs::write(dir.join("started"), b"").map_err(|e| e.to_string())?;
        info!(vm = name, accel = l.accel, "vm started");
        Ok(())
    }

    /// Sends `verb` through QMP. Powerdown and quit mark the stop as asked for (not a crash).
    pub fn command(&self, name: &str, verb: Verb) -> Result<(), String> {
        let dir = self.dir(name);
        if verb != Verb::Reset {
            std::fs::write(dir.join("stopped"), b"").map_err(|e| format!("VM {name}: {e}"))?;
        }
        if self.pid(name).is_none() {
            return Ok(());
        }
        if self.libvirt(name) {
            let verb = match verb {
                Verb::Powerdown => "shutdown",
                Verb::Quit => "destroy",
                Verb::Reset => "reset",
            };
            return virsh(&[verb, &domain(name)]);
        }
        let mut q = Qmp::connect(&dir.join("qmp.sock")).map_err(|e| format!("VM {name}: QMP: {e}"))?;
        let cmd = match verb {
            Verb::Powerdown => "system_powerdown",
            Verb::Quit => "quit",
            Verb::Reset => "system_reset",
        };
        match q.execute(cmd) {
            Ok(_) => Ok(()),
            // quit may close the socket before it answers.
            Err(_) if verb == Verb::Quit => Ok(()),
            Err(e) => Err(format!("VM {name}: {e}")),
        }
    }

    /// Stops the VM if it runs and removes every file of it and its tap device.
    pub fn remove(&self, name: &str) -> Result<(), String> {
        if self.pid(name).is_some() {
            let _ = self.command(name, Verb::Quit);
            for _ in 0..50 {
                if self.pid(name).is_none() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(pid) = self.pid(name) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        if self.libvirt(name) {
            let _ = virsh(&["destroy", &domain(name)]);
            let _ = virsh(&["undefine", &domain(name)]);
        }
        let net = self.launch(name).ok().and_then(|l| l.net);
        if net.is_some() {
            let _ = run(Command::new("ip").args(["link", "del", &tap_name(name)]));
        }
        match std::fs::remove_dir_all(self.dir(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(format!("VM {name}: {e}")),
            _ => {}
        }
        if let Some(net) = net {
            self.teardown(&net);
        }
        Ok(())
    }

    /// Whether this node name has ever had a VM (its directory exists): one stat, quick
    /// enough to ask from a task every report.
    pub fn any(&self) -> bool {
        self.root.is_dir()
    }

    /// Every VM of this node as it stands; a running VM found here (after an agent restart)
    /// is adopted through its QMP socket.
    pub fn status(&self) -> Vec<VmStatus> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else { continue };
            let Ok(l) = self.launch(&name) else { continue };
            let dir = e.path();
            let running = self.pid(&name).is_some();
            let crashed = !running && dir.join("started").exists() && !dir.join("stopped").exists();
            let console_len = std::fs::metadata(dir.join("console")).map_or(0, |m| m.len());
            out.push(VmStatus { id: l.id, name, running, crashed, console_len });
        }
        out
    }

    /// Checks every running VM answers on its QMP socket (after an agent restart).
    pub fn adopt(&self) {
        for s in self.status().into_iter().filter(|s| s.running) {
            match Qmp::connect(&self.dir(&s.name).join("qmp.sock")).and_then(|mut q| q.execute("query-status")) {
                Ok(st) => info!(vm = s.name, status = %st, "adopted a running VM"),
                Err(e) => warn!(vm = s.name, error = %e, "a running VM does not answer on its QMP socket"),
            }
        }
    }

    /// Up to `max` bytes of VM `name`'s console from `offset`.
    pub fn console(&self, name: &str, offset: u64, max: usize) -> Option<Vec<u8>> {
        clusterfs::jobs::read_at(&self.dir(name).join("console"), offset, max).ok()
    }

    /// The name of the VM with head id `id`.
    pub fn name_of(&self, id: u64) -> Option<String> {
        self.status().into_iter().find(|s| s.id == id).map(|s| s.name)
    }

    /// The bridge (with the gateway address, DHCP from dnsmasq and NAT), and the VM's fixed
    /// address in dnsmasq's hosts.
    fn bridge(&self, l: &Launch, net: &Net) -> Result<(), String> {
        let _guard = self.net.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let br = &net.bridge;
        if !Path::new("/sys/class/net").join(br).exists() {
            run(Command::new("ip").args(["link", "add", br, "type", "bridge"]))?;
            run(Command::new("ip").args(["addr", "add", &format!("{}/{}", net.gateway, net.prefix), "dev", br]))?;
            run(Command::new("ip").args(["link", "set", br, "up"]))?;
            if let Some(up) = &net.uplink {
                run(Command::new("ip").args(["link", "set", up, "master", br]))?;
            }
            // NAT to the outside, when iptables is there.
            let _ = nat(net, "-A");
            let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1");
        }
        self.dhcp(br, net)?;
        let hosts = run_dir().join(format!("dnsmasq-{br}.hosts"));
        let line = format!("{},{},{}\n", l.mac, net.ip, l.name);
        let mut all = std::fs::read_to_string(&hosts).unwrap_or_default();
        if !all.contains(&line) {
            all.push_str(&line);
            std::fs::write(&hosts, all).map_err(|e| e.to_string())?;
            if let Ok(pid) = std::fs::read_to_string(run_dir().join(format!("dnsmasq-{br}.pid")))
                && let Ok(pid) = pid.trim().parse::<i32>()
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP);
            }
        }
        Ok(())
    }

    /// The VM's tap on the bridge (the qemu backend; libvirt makes its own).
    fn tap(&self, name: &str, br: &str) -> Result<String, String> {
        let tap = tap_name(name);
        if !Path::new("/sys/class/net").join(&tap).exists() {
            run(Command::new("ip").args(["tuntap", "add", "dev", &tap, "mode", "tap"]))?;
        }
        run(Command::new("ip").args(["link", "set", &tap, "master", br]))?;
        run(Command::new("ip").args(["link", "set", &tap, "up"]))?;
        Ok(tap)
    }

    /// The libvirt backend: the domain is defined from the clone's files and started by
    /// libvirtd, which keeps it across agent restarts.
    fn start_libvirt(&self, l: &Launch) -> Result<(), String> {
        if let Some(net) = &l.net {
            self.bridge(l, net)?;
        }
        let dir = self.dir(&l.name);
        let xml = dir.join("domain.xml");
        std::fs::write(&xml, domain_xml(l, &dir)).map_err(|e| format!("domain.xml: {e}"))?;
        // Defined anew each start (it is not running): the definition follows the clone.
        let _ = virsh(&["undefine", &domain(&l.name)]);
        virsh(&["define", &xml.to_string_lossy()])?;
        virsh(&["start", &domain(&l.name)]).map_err(|e| format!("starting through libvirt: {e}"))?;
        let _ = std::fs::remove_file(dir.join("stopped"));
        std::fs::write(dir.join("started"), b"").map_err(|e| e.to_string())?;
        info!(vm = l.name, "vm started through libvirt");
        Ok(())
    }

    /// dnsmasq serving DHCP on the bridge, each VM its fixed address: one per bridge on the
    /// machine, shared by every agent process there.
    fn dhcp(&self, br: &str, net: &Net) -> Result<(), String> {
        let dir = run_dir();
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let pidfile = dir.join(format!("dnsmasq-{br}.pid"));
        let alive =
            std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse::<i32>().ok()).is_some_and(|p| {
                // A live dnsmasq, not a pid taken by something else or a zombie.
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next());
                cmd.starts_with(b"dnsmasq") && state.is_some_and(|s| s != "Z")
            });
        if alive {
            return Ok(());
        }
        let hosts = dir.join(format!("dnsmasq-{br}.hosts"));
        if !hosts.exists() {
            std::fs::write(&hosts, b"").map_err(|e| e.to_string())?;
        }
        run(Command::new("dnsmasq")
            // It rereads the hosts file in the agent's state directory on SIGHUP: stay root.
            .args(["--port=0", "--bind-interfaces", "--except-interface=lo", "--conf-file=/dev/null", "--user=root"])
            .arg(format!("--interface={br}"))
            .arg(format!("--dhcp-range={},static,{}", net.gateway, net.prefix_mask()))
            .arg(format!("--dhcp-hostsfile={}", hosts.display()))
            .arg(format!("--pid-file={}", pidfile.display()))
            .arg(format!("--dhcp-leasefile={}", dir.join(format!("dnsmasq-{br}.leases")).display())))
    }

    /// Once no VM of the machine hangs on the bridge: dnsmasq, NAT and the bridge go.
    fn teardown(&self, net: &Net) {
        let _guard = self.net.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let br = &net.bridge;
        let ports: Vec<String> = std::fs::read_dir(Path::new("/sys/class/net").join(br).join("brif"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        if ports.iter().any(|p| Some(p) != net.uplink.as_ref()) {
            return;
        }
        let dir = run_dir();
        if let Ok(pid) = std::fs::read_to_string(dir.join(format!("dnsmasq-{br}.pid")))
            && let Ok(pid) = pid.trim().parse::<i32>()
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        for f in ["pid", "hosts", "leases"] {
            let _ = std::fs::remove_file(dir.join(format!("dnsmasq-{br}.{f}")));
        }
        let _ = nat(net, "-D");
        let _ = run(Command::new("ip").args(["link", "del", br]));
        info!(bridge = br, "the VM bridge is torn down: no VM uses it");
    }
}

trait Mask {
    fn prefix_mask(&self) -> String;
}

impl Mask for Net {
    fn prefix_mask(&self) -> String {
        std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix))).to_string()
    }
}

/// Returns once no process holds a lock on `path` (or it does not exist), or after `most`.
fn wait_unlocked(path: &Path, most: Duration) {
    use std::os::fd::AsRawFd;
    let Ok(file) = std::fs::File::open(path) else { return };
    let deadline = std::time::Instant::now() + most;
    loop {
        // SAFETY: a zeroed flock is valid; F_GETLK fills it for this open descriptor.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: the descriptor is open for the call and `lock` outlives it.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) };
        if rc != 0 || lock.l_type == libc::F_UNLCK as libc::c_short {
            return;
        }
        if std::time::Instant::now() >= deadline {
            warn!(path = %path.display(), holder = lock.l_pid, "a pid file stays locked: starting anyway");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `kvm` needs the KVM device on the node; the error says what to do instead.
fn accel_check(accel: &str, kvm: &Path) -> Result<(), String> {
    if accel == "kvm" && !kvm.exists() {
        return Err(format!("KVM is not available on this node (no {}): set vms.accel = \"tcg\"", kvm.display()));
    }
    Ok(())
}

/// Adds (`-A`) or deletes (`-D`) the NAT rule of the VM subnet.
fn nat(net: &Net, op: &str) -> Result<(), String> {
    let subnet = format!("{}/{}", net.gateway, net.prefix);
    run(Command::new("iptables").args([
        "-t",
        "nat",
        op,
        "POSTROUTING",
        "-s",
        &subnet,
        "!",
        "-d",
        &subnet,
        "-j",
        "MASQUERADE",
    ]))
}

/// Where the machine-wide VM network state lives (dnsmasq's pid, hosts and leases per bridge).
fn run_dir() -> PathBuf {
    PathBuf::from("/run/clusterfs")
}

/// The qemu binary must be on this node before a VM is made for it.
pub fn check_qemu(qemu: &str) -> Result<(), String> {
    let found = if qemu.contains('/') {
        Path::new(qemu).exists()
    } else {
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(qemu).exists()))
    };
    if found {
        Ok(())
    } else {
        Err(format!("{qemu} is not installed on this node (Debian: apt install qemu-system-x86)"))
    }
}

/// qemu runs as root, like the qemu backend's: the clone's files stay in the agent's state
/// directory, which libvirt's own qemu user cannot reach.
const RUN_AS_ROOT: &str = "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>";

/// The libvirt domain of a VM.
fn domain(name: &str) -> String {
    format!("clusterfs-{name}")
}

fn virsh(args: &[&str]) -> Result<(), String> {
    run(Command::new("virsh").args(["-q", "-c", "qemu:///system"]).args(args))
}

/// Text for an XML attribute or element.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

/// The domain of a clone: its overlay and data disk, the console appended to a file, the NIC
/// on the VM bridge with its fixed MAC.
fn domain_xml(l: &Launch, dir: &Path) -> String {
    let p = |f: &str| esc(&dir.join(f).to_string_lossy());
    let kind = if l.accel == "kvm" { "kvm" } else { "qemu" };
    let mut os = String::from("<type arch='x86_64'>hvm</type>");
    if let Some(k) = &l.template.kernel {
        os += &format!("<kernel>{}</kernel>", esc(&k.to_string_lossy()));
        if let Some(i) = &l.template.initrd {
            os += &format!("<initrd>{}</initrd>", esc(&i.to_string_lossy()));
        }
        let append = [l.template.append.as_deref(), l.append.as_deref()].into_iter().flatten().collect::<Vec<_>>();
        os += &format!("<cmdline>{}</cmdline>", esc(&append.join(" ")));
    }
    let mut devices = format!(
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
        p("disk.qcow2")
    );
    if l.data_disk.is_some() {
        devices += &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{}'/><target dev='vdb' bus='virtio'/></disk>",
            p("data.qcow2")
        );
    }
    devices += &format!("<serial type='file'><source path='{}' append='on'/><target port='0'/></serial>", p("console"));
    if let Some(net) = &l.net {
        devices += &format!(
            "<interface type='bridge'><source bridge='{}'/><mac address='{}'/><model type='virtio'/></interface>",
            esc(&net.bridge),
            esc(&l.mac)
        );
    }
    format!(
        "<domain type='{kind}'><name>{}</name><memory unit='MiB'>{}</memory><vcpu>{}</vcpu><os>{os}</os><features><acpi/></features><devices>{devices}</devices>{RUN_AS_ROOT}</domain>\n",
        esc(&domain(&l.name)),
        l.mem >> 20,
        l.cpus
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_waits_for_the_last_qemu_to_let_go_of_its_pid_file() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pid");
        std::fs::write(&path, "1\n").unwrap();
        // An open file description's lock, as a qemu holds it (OFD locks conflict within a
        // process too).
        let held = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // SAFETY: a zeroed flock is valid; the descriptor is open for the call.
        let rc = unsafe {
            let mut lock: libc::flock = std::mem::zeroed();
            lock.l_type = libc::F_WRLCK as libc::c_short;
            libc::fcntl(held.as_raw_fd(), libc::F_OFD_SETLK, &mut lock)
        };
        assert_eq!(rc, 0);
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let started = std::time::Instant::now();
        wait_unlocked(&path, Duration::from_secs(5));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(4), "{waited:?}");
        release.join().unwrap();
        // Nothing holds it now, and a missing file: at once.
        let started = std::time::Instant::now();
        wait_unlocked(&path, Duration::from_secs(5));
        wait_unlocked(&dir.path().join("none"), Duration::from_secs(5));
        assert!(started.elapsed() < Duration::from_millis(200));
    }

    #[test]
    fn kvm_without_its_device_is_a_clear_error() {
        let none = Path::new("/nonexistent/kvm");
        assert!(accel_check("kvm", none).unwrap_err().contains("set vms.accel = \"tcg\""));
        assert!(accel_check("tcg", none).is_ok());
    }

    #[test]
    fn a_domain_holds_the_clone_and_escapes_what_it_quotes() {
        let t = clusterfs::vms::parse_template(r#"{"disk":"/t/b.qcow2","kernel":"/k","append":"a='1'&b"}"#).unwrap();
        let l = Launch {
            id: 1,
            name: "v1".into(),
            template: t,
            mem: 256 << 20,
            cpus: 2,
            data_disk: Some(1 << 20),
            append: None,
            mac: clusterfs::vms::mac("v1"),
            net: None,
            accel: "tcg".into(),
            qemu: "qemu-system-x86_64".into(),
        };
        let xml = domain_xml(&l, Path::new("/s/v1"));
        assert!(xml.contains("<name>clusterfs-v1</name>") && xml.contains("<memory unit='MiB'>256</memory>"));
        assert!(xml.contains("/s/v1/disk.qcow2") && xml.contains("/s/v1/data.qcow2"));
        assert!(xml.contains("a=&apos;1&apos;&amp;b"), "{xml}");
        assert!(xml.contains("<domain type='qemu'>"));
    }
}
