//! vms/: real qemu guests (TCG) cloned from a template, on a real bridge, driven through files.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::can_mount;
use crate::harness::{Cluster, eventually, sh_as};

const BRIDGE: &str = "cftbr0";
const SUBNET: &str = "10.77.0.0/24";

/// Kills what the test's VMs left running, even when the test fails.
struct Guard {
    dir: PathBuf,
    bridge: &'static str,
    nat: &'static str,
    /// libvirt domains to destroy and undefine.
    domains: &'static [&'static str],
    /// The VMs whose taps go.
    vms: &'static [&'static str],
}

/// Runs a cleanup command quietly: what it removes may be gone already.
fn quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

impl Drop for Guard {
    fn drop(&mut self) {
        let dir = self.dir.display().to_string();
        for d in self.domains {
            quiet(&["virsh", "-c", "qemu:///system", "destroy", d]);
            quiet(&["virsh", "-c", "qemu:///system", "undefine", d]);
        }
        quiet(&["pkill", "-9", "-f", &format!("qemu-system.*{dir}")]);
        quiet(&["pkill", "-f", &format!("dnsmasq.*{}", self.bridge)]);
        quiet(&["ip", "link", "del", self.bridge]);
        for f in ["pid", "hosts", "leases"] {
            let _ = fs::remove_file(format!("/run/clusterfs/dnsmasq-{}.{f}", self.bridge));
        }
        // Only this test's taps: other tests run VMs at the same time.
        for vm in self.vms {
            quiet(&["ip", "link", "del", &clusterfs::vms::tap_name(vm)]);
        }
        let nat = self.nat;
        quiet(&["iptables", "-t", "nat", "-D", "POSTROUTING", "-s", nat, "!", "-d", nat, "-j", "MASQUERADE"]);
    }
}

/// A guest template: the installed Debian kernel and a busybox initramfs whose init prints a
/// marker, takes its address by DHCP, pings `peer=` from its command line, and waits.
fn template(dir: &Path) -> String {
    template_with(dir, None)
}

/// Copies `bin` into the initramfs `root` at the same path, with the libraries it links.
fn copy_with_libs(bin: &Path, to: &Path, root: &Path) {
    let ok = Command::new("strip").arg("-o").arg(root.join(to.strip_prefix("/").unwrap())).arg(bin).status().unwrap();
    assert!(ok.success(), "strip {}", bin.display());
    let out = Command::new("ldd").arg(bin).output().unwrap();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let path = l.split_whitespace().find(|w| w.starts_with('/')).map(PathBuf::from);
        if let Some(p) = path {
            let at = root.join(p.strip_prefix("/").unwrap());
            fs::create_dir_all(at.parent().unwrap()).unwrap();
            fs::copy(&p, &at).unwrap();
        }
    }
}

/// Like `template`; with `agent` (the cluster secret) the guest also runs clusterfs-agent
/// against `agent=<head>` from its command line, as node `vmname=<name>`.
fn template_with(dir: &Path, agent: Option<&Path>) -> String {
    let kernel = fs::read_dir("/boot")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .expect("a kernel in /boot (linux-image-amd64)");
    let version = kernel.file_name().unwrap().to_string_lossy().trim_start_matches("vmlinuz-").to_string();
    let root = dir.join("initramfs");
    for d in ["bin", "proc", "sys", "dev", "etc", "lib/modules"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    let modules = [
        "virtio_ring",
        "virtio",
        "virtio_pci_modern_dev",
        "virtio_pci_legacy_dev",
        "virtio_pci",
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_blk",
    ];
    for m in modules {
        let out = Command::new("find")
            .arg(format!("/lib/modules/{version}"))
            .args(["-name", &format!("{m}.ko")])
            .output()
            .unwrap();
        let path = String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_string);
        if let Some(p) = path {
            fs::copy(p, root.join("lib/modules").join(format!("{m}.ko"))).unwrap();
        }
    }
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
         for m in {}; do insmod /lib/modules/$m.ko 2>/dev/null; done\n\
         echo \"CLUSTERFS-GUEST-UP disks: $(ls /dev/vd* | tr '\\n' ' ')\"\n\
         ip link set eth0 up\n\
         udhcpc -i eth0 -s /etc/udhcpc.sh -q -n -t 60 -T 1 >/dev/null 2>&1 && echo \"CLUSTERFS-DHCP $(ip -4 -o addr show eth0 | awk '{{print $4}}')\"\n\
         peer=$(sed -n 's/.*peer=\\([0-9.]*\\).*/\\1/p' /proc/cmdline)\n\
         if [ -n \"$peer\" ]; then for i in $(seq 1 120); do ping -c 1 -W 1 $peer >/dev/null 2>&1 && {{ echo \"CLUSTERFS-PEER-OK $peer\"; break; }}; sleep 1; done; fi\n\
         while :; do sleep 1; done\n",
        modules.join(" ")
    );
    let init = match agent {
        None => init,
        Some(secret) => {
            fs::create_dir_all(root.join("etc/clusterfs")).unwrap();
            fs::copy(secret, root.join("etc/clusterfs/secret")).unwrap();
            fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
            fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
            copy_with_libs(&crate::harness::bin("clusterfs-agent"), Path::new("/bin/clusterfs-agent"), &root);
            let start = "head=$(sed -n 's/.*agent=\\([0-9.:]*\\).*/\\1/p' /proc/cmdline)\n\
                 name=$(sed -n 's/.*vmname=\\([A-Za-z0-9-]*\\).*/\\1/p' /proc/cmdline)\n\
                 mkdir -p /root /tmp /var/agent; hostname $name\n\
                 CLUSTERFS_LOG=warn /bin/clusterfs-agent --head $head --name $name --secret-file /etc/clusterfs/secret --state /var/agent >/dev/console 2>&1 &\n\
                 echo CLUSTERFS-AGENT-STARTED\n";
            init.replace("while :; do sleep 1; done\n", &format!("{start}while :; do sleep 1; done\n"))
        }
    };
    fs::write(root.join("init"), init).unwrap();
    fs::write(
        root.join("etc/udhcpc.sh"),
        "#!/bin/sh\ncase \"$1\" in bound|renew) ip addr flush dev $interface; ip addr add $ip/$mask dev $interface ;; esac\n",
    )
    .unwrap();
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod +x {r}/init {r}/etc/udhcpc.sh && cd {r} && find . | cpio -o -H newc 2>/dev/null | gzip > {d}/initrd.gz && qemu-img create -q -f qcow2 {d}/base.qcow2 64M",
            r = root.display(),
            d = dir.display()
        ))
        .status()
        .unwrap()
        .success();
    assert!(ok, "building the guest failed");
    format!(
        "{{\"disk\":\"{d}/base.qcow2\",\"kernel\":\"{k}\",\"initrd\":\"{d}/initrd.gz\",\"append\":\"console=ttyS0 quiet\",\"mem\":\"256M\",\"cpus\":1}}\n",
        d = dir.display(),
        k = kernel.display()
    )
}

fn wait_console(c: &Cluster, vm: &str, what: &str, timeout_s: u64) {
    let ok = eventually(Duration::from_secs(timeout_s), || {
        c.try_read(&format!("vms/{vm}/console")).is_some_and(|s| s.contains(what))
    });
    assert!(
        ok,
        "{vm}'s console never showed {what:?}; console: {:?}; state: {:?}",
        c.try_read(&format!("vms/{vm}/console")),
        c.try_read(&format!("vms/{vm}/state"))
    );
}

fn wait_state(c: &Cluster, vm: &str, want: &str, timeout_s: u64) {
    let ok = eventually(Duration::from_secs(timeout_s), || {
        c.try_read(&format!("vms/{vm}/state")).is_some_and(|s| s.starts_with(want))
    });
    assert!(ok, "{vm} never became {want:?}: {:?}", c.try_read(&format!("vms/{vm}/state")));
}

fn qemu_pid(vm_dir: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(vm_dir.join("pid")).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

#[test]
fn clones_boot_share_a_bridge_survive_an_agent_restart_and_leave_nothing() {
    if !can_mount() {
        return;
    }
    let extra = format!(
        "[vms]\naccel = \"tcg\"\ndefault_template = \"tiny\"\nshutdown_timeout_s = 3\nsubnet = \"{SUBNET}\"\nbridge = \"{BRIDGE}\"\n"
    );
    let mut c = Cluster::up_with("cn1", 300, &extra);
    let work = c.path("").parent().unwrap().to_path_buf();
    let _guard =
        Guard { dir: work.clone(), bridge: BRIDGE, nat: "10.77.0.1/24", domains: &[], vms: &["vma", "vmb", "vmc"] };
    let tdir = work.join("template");
    fs::create_dir_all(&tdir).unwrap();
    let t = template(&tdir);
    // Only root writes templates.
    let (code, _, _) = sh_as("cfbob", &format!("echo '{}' > {}", t.trim(), c.path("vms/templates/nope").display()));
    assert_ne!(code, 0);
    assert_eq!(c.write("vms/templates/tiny", t.as_bytes()), Ok(()), "{}", c.read("vms/error"));
    assert!(c.read("vms/templates/tiny").contains("base.qcow2"));

    // Bad specs: a clear error each, nothing made.
    for (spec, errno, says) in [
        (r#"{"name":"v1","template":"nosuch"}"#, libc::ENOENT, "no template nosuch"),
        (r#"{"name":"v1","mem":"lots"}"#, libc::EINVAL, "not a size"),
        (r#"{"name":"v1","cpus":0}"#, libc::EINVAL, "cpus"),
        (r#"{"name":"a/b"}"#, libc::EINVAL, "name"),
        (r#"{"name":"v1","colour":"red"}"#, libc::EINVAL, "colour"),
        (r#"{"name":"v1","cpus":256}"#, libc::ENOSPC, "no up, undrained node has 256 cpus (the most is"),
        (r#"{"name":"v1","cpus":256,"node":"cn1"}"#, libc::ENOSPC, "fewer than the VM's 256 vcpus"),
    ] {
        assert_eq!(c.write("vms/new", spec.as_bytes()), Err(errno), "{spec}");
        let err = c.read("vms/error");
        assert!(err.contains(says), "{spec}: {err}");
    }
    assert!(!c.read("vms/README").is_empty());
    let listing: Vec<String> =
        fs::read_dir(c.path("vms")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    assert!(!listing.iter().any(|n| n == "v1"), "{listing:?}");

    // The VMs run on a node of their own agent, which is killed and restarted below.
    let agent = c.agent_with(&["--name", "vmnode"]);
    assert!(eventually(Duration::from_secs(20), || c.read("nodes/up").contains("vmnode")));
    let (net, prefix) = clusterfs::vms::parse_subnet(SUBNET).unwrap();
    let ip_a = clusterfs::vms::ip("vma", net, prefix);
    let a = r#"{"name":"vma","node":"vmnode","data_disk":"32M"}"#;
    let b = format!(r#"{{"name":"vmb","node":"vmnode","data_disk":"64M","append":"peer={ip_a}","restart":"always"}}"#);
    assert_eq!(c.write("vms/new", a.as_bytes()), Ok(()), "{}", c.read("vms/error"));
    assert_eq!(c.write("vms/new", b.as_bytes()), Ok(()), "{}", c.read("vms/error"));
    assert_eq!(c.write("vms/new", a.as_bytes()), Err(libc::EEXIST));
    let vms_dir = work.join("agents/vmnode/vms");
    for (vm, size) in [("vma", 32u64 << 20), ("vmb", 64 << 20)] {
        let d = vms_dir.join(vm);
        let info =
            Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(d.join("disk.qcow2")).output().unwrap();
        let info = String::from_utf8_lossy(&info.stdout).to_string();
        assert!(
            info.contains(&format!("{}/base.qcow2", tdir.display())),
            "{vm}'s disk is not an overlay on the template: {info}"
        );
        let data =
            Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(d.join("data.qcow2")).output().unwrap();
        assert!(String::from_utf8_lossy(&data.stdout).contains(&format!("\"virtual-size\": {size}")));
    }
    assert_eq!(c.read("vms/vma/ip"), format!("{ip_a}\n"));
    assert_eq!(c.read("vms/vma/node"), "vmnode\n");

    // Both boot (the marker shows in console), take their address and reach each other.
    wait_console(&c, "vma", "CLUSTERFS-GUEST-UP disks: /dev/vda /dev/vdb", 120);
    wait_console(&c, "vmb", "CLUSTERFS-GUEST-UP", 120);
    wait_console(&c, "vma", &format!("CLUSTERFS-DHCP {ip_a}/24"), 120);
    wait_console(&c, "vmb", &format!("CLUSTERFS-PEER-OK {ip_a}"), 180);
    wait_state(&c, "vma", "running on vmnode", 10);
    let console_len = fs::metadata(c.path("vms/vma/console")).unwrap().len();
    assert_eq!(console_len as usize, c.read("vms/vma/console").len(), "console's size is not its length");
    let template_before = fs::read(tdir.join("base.qcow2")).unwrap();

    // Another user may not act on them.
    crate::jobs::users();
    let (code, _, _) = sh_as("cfbob", &format!("echo destroy > {}", c.path("vms/vma/ctl").display()));
    assert_ne!(code, 0);

    // The agent dies and comes back: the VMs kept running and are adopted.
    let pid_a = qemu_pid(&vms_dir.join("vma")).expect("vma's qemu runs");
    c.kill_agent(agent);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(qemu_pid(&vms_dir.join("vma")), Some(pid_a), "the VM died with its agent");
    c.agent_with(&["--name", "vmnode"]);
    assert!(eventually(Duration::from_secs(20), || c.read("nodes/up").contains("vmnode")));
    wait_state(&c, "vma", "running on vmnode", 20);
    assert_eq!(qemu_pid(&vms_dir.join("vma")), Some(pid_a), "the VM was started again, not adopted");
    // The head dies and comes back: its VMs are neither lost nor started twice.
    let pid_b = qemu_pid(&vms_dir.join("vmb")).expect("vmb's qemu runs");
    c.crash_head();
    c.start_head();
    assert!(eventually(Duration::from_secs(30), || c.read("nodes/up").contains("vmnode")));
    wait_state(&c, "vma", "running on vmnode", 30);
    wait_state(&c, "vmb", "running on vmnode", 30);
    assert_eq!(qemu_pid(&vms_dir.join("vma")), Some(pid_a), "vma was started again after a head crash");
    assert_eq!(qemu_pid(&vms_dir.join("vmb")), Some(pid_b), "vmb was started again after a head crash");
    // Their history too came through the crash.
    let history = c.read("vms/vma/state");
    assert!(history.contains("made on vmnode") && history.contains("started on vmnode"), "{history}");

    // vmb has restart=always: killed, it is started again.
    let pid_b = qemu_pid(&vms_dir.join("vmb")).expect("vmb's qemu runs");
    let _ = Command::new("kill").args(["-9", &pid_b.to_string()]).status();
    let restarted = eventually(Duration::from_secs(30), || qemu_pid(&vms_dir.join("vmb")).is_some_and(|p| p != pid_b));
    assert!(restarted, "vmb was not restarted: {}", c.read("vms/vmb/state"));
    wait_state(&c, "vmb", "running on vmnode", 20);
    // shutdown: ACPI (this guest ignores it), then destroyed after the timeout.
    c.write("vms/vmb/ctl", b"shutdown\n").unwrap();
    wait_state(&c, "vmb", "off on vmnode", 30);
    assert!(qemu_pid(&vms_dir.join("vmb")).is_none());
    // Its history says each step once, and keeps what came before.
    std::thread::sleep(Duration::from_secs(1));
    let history = c.read("vms/vmb/state");
    for step in ["asked to be off", "ACPI shutdown asked", "destroyed after the shutdown timeout", "Z off\n"] {
        assert_eq!(history.matches(step).count(), 1, "{step:?} in {history}");
    }
    assert!(history.contains("crashed: it stopped without being asked to"), "{history}");
    // A VM that dies on its own is crashed, and stays down (restart=never) until started.
    let _ = Command::new("kill").args(["-9", &pid_a.to_string()]).status();
    wait_state(&c, "vma", "crashed on vmnode", 20);
    std::thread::sleep(Duration::from_secs(2));
    assert!(c.read("vms/vma/state").starts_with("crashed"), "a crashed VM was restarted");
    c.write("vms/vma/ctl", b"start\n").unwrap();
    wait_state(&c, "vma", "running on vmnode", 30);
    assert!(qemu_pid(&vms_dir.join("vma")).is_some_and(|p| p != pid_a));
    // reboot resets the guest: it boots again, its console goes on.
    let boots = |c: &Cluster| c.try_read("vms/vma/console").unwrap_or_default().matches("CLUSTERFS-GUEST-UP").count();
    assert!(eventually(Duration::from_secs(120), || boots(&c) == 2), "vma did not boot after its start");
    c.write("vms/vma/ctl", b"reboot\n").unwrap();
    assert!(eventually(Duration::from_secs(120), || boots(&c) == 3), "vma did not boot again after reboot");
    // Desired state through `state`.
    c.write("vms/vma/state", b"off\n").unwrap();
    wait_state(&c, "vma", "off on vmnode", 30);
    assert_eq!(c.write("vms/vma/state", b"paused\n"), Err(libc::EINVAL));
    assert_eq!(c.write("vms/vma/ctl", b"explode\n"), Err(libc::EINVAL));

    // mkdir clones the default template on the best node and starts it.
    fs::create_dir(c.path("vms/vmc")).unwrap();
    assert!(c.read("vms/vmc/state").starts_with("starting on ") || c.read("vms/vmc/state").starts_with("running on "));
    // Its console reads (empty at first: nothing spooled yet), as `tail -f` does at once.
    let console = fs::read(c.path("vms/vmc/console"));
    assert!(console.is_ok(), "{console:?}: {}", c.read("vms/vmc/error"));

    // destroy stops it at once.
    wait_state(&c, "vmc", "running on ", 30);
    c.write("vms/vmc/ctl", b"destroy\n").unwrap();
    wait_state(&c, "vmc", "off on ", 10);
    // rmdir removes every file of each VM.
    for vm in ["vma", "vmb", "vmc"] {
        fs::remove_dir(c.path(&format!("vms/{vm}"))).unwrap_or_else(|e| panic!("rmdir {vm}: {e}"));
        assert!(!c.path(&format!("vms/{vm}")).exists());
    }
    assert!(!vms_dir.join("vma").exists() && !vms_dir.join("vmb").exists());
    assert!(!work.join("state/agent/cn1/vms/vmc").exists());
    // The last VM gone, its node tears the network down.
    assert!(
        eventually(Duration::from_secs(10), || !Path::new("/sys/class/net").join(BRIDGE).exists()),
        "the bridge stayed"
    );
    assert_eq!(fs::read(tdir.join("base.qcow2")).unwrap(), template_before, "a clone wrote into its template");
}

#[test]
fn a_missing_qemu_is_a_clear_error_and_nothing_is_made() {
    if !can_mount() {
        return;
    }
    let c = Cluster::up_with("cn1", 300, "[vms]\nqemu = \"/nonexistent/qemu-system-x86_64\"\n");
    let work = c.path("").parent().unwrap().to_path_buf();
    fs::create_dir_all(work.join("t")).unwrap();
    fs::write(work.join("t/base.qcow2"), b"").unwrap();
    let t = format!("{{\"disk\":\"{}/t/base.qcow2\",\"format\":\"raw\"}}\n", work.display());
    assert_eq!(c.write("vms/templates/default", t.as_bytes()), Ok(()));
    let e = fs::create_dir(c.path("vms/v1")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(
        c.read("vms/error").contains("/nonexistent/qemu-system-x86_64 is not installed"),
        "{}",
        c.read("vms/error")
    );
    assert!(!c.path("vms/v1").exists());
    assert!(!work.join("state/agent/cn1/vms/v1").exists());
}

/// libvirtd and virtlogd for the libvirt backend: started here when not running, stopped
/// again after the test. None when they cannot run here (outside CI: the test is skipped).
struct Libvirtd {
    started: bool,
}

impl Libvirtd {
    fn up() -> Option<Libvirtd> {
        let answers = || {
            Command::new("virsh")
                .args(["-c", "qemu:///system", "version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if answers() {
            return Some(Libvirtd { started: false });
        }
        let _ = Command::new("virtlogd").arg("-d").status();
        let _ = Command::new("libvirtd").arg("-d").status();
        if eventually(Duration::from_secs(15), answers) {
            return Some(Libvirtd { started: true });
        }
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but libvirtd cannot be started (scripts/install-deps installs libvirt-daemon-system)");
        }
        eprintln!("skipping: libvirtd cannot be started here");
        None
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if self.started {
            quiet(&["pkill", "-x", "libvirtd"]);
            quiet(&["pkill", "-x", "virtlogd"]);
        }
    }
}

fn domstate(domain: &str) -> String {
    let out = Command::new("virsh").args(["-c", "qemu:///system", "domstate", domain]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_libvirt_template_runs_its_clones_through_virsh() {
    if !can_mount() {
        return;
    }
    let Some(_libvirtd) = Libvirtd::up() else { return };
    let extra = "[vms]\naccel = \"tcg\"\nshutdown_timeout_s = 3\nsubnet = \"10.78.0.0/24\"\nbridge = \"cftbr1\"\n";
    let c = Cluster::up_with("cn1", 300, extra);
    let work = c.path("").parent().unwrap().to_path_buf();
    let _guard =
        Guard { dir: work.clone(), bridge: "cftbr1", nat: "10.78.0.1/24", domains: &["clusterfs-lva"], vms: &[] };
    let tdir = work.join("template");
    fs::create_dir_all(&tdir).unwrap();
    let t = template(&tdir).replace("\"cpus\":1}", "\"cpus\":1,\"backend\":\"libvirt\"}");
    assert_eq!(c.write("vms/templates/lv", t.as_bytes()), Ok(()), "{}", c.read("vms/error"));
    let spec = r#"{"name":"lva","template":"lv","data_disk":"16M"}"#;
    assert_eq!(c.write("vms/new", spec.as_bytes()), Ok(()), "{}", c.read("vms/error"));
    let (net, prefix) = clusterfs::vms::parse_subnet("10.78.0.0/24").unwrap();
    let ip = clusterfs::vms::ip("lva", net, prefix);
    wait_console(&c, "lva", "CLUSTERFS-GUEST-UP disks: /dev/vda /dev/vdb", 120);
    wait_console(&c, "lva", &format!("CLUSTERFS-DHCP {ip}/24"), 120);
    wait_state(&c, "lva", "running on cn1", 10);
    assert_eq!(domstate("clusterfs-lva"), "running");
    // shutdown through libvirt (ACPI; this guest ignores it), then destroyed after the timeout.
    c.write("vms/lva/ctl", b"shutdown\n").unwrap();
    wait_state(&c, "lva", "off on cn1", 30);
    assert!(eventually(Duration::from_secs(10), || domstate("clusterfs-lva") == "shut off"));
    c.write("vms/lva/ctl", b"start\n").unwrap();
    wait_state(&c, "lva", "running on cn1", 30);
    fs::remove_dir(c.path("vms/lva")).unwrap();
    let gone = Command::new("virsh").args(["-c", "qemu:///system", "dominfo", "clusterfs-lva"]).output().unwrap();
    assert!(!gone.status.success(), "the domain is still defined");
    assert!(!work.join("state/agent/cn1/vms/lva").exists());
    assert!(eventually(Duration::from_secs(10), || !Path::new("/sys/class/net/cftbr1").exists()), "the bridge stayed");
}

#[test]
fn a_vm_running_the_agent_joins_as_a_node_and_runs_jobs() {
    if !can_mount() {
        return;
    }
    let extra = "[vms]\naccel = \"tcg\"\nsubnet = \"10.79.0.0/24\"\nbridge = \"cftbr2\"\n";
    let c = Cluster::up_on("cn1", 300, extra, "0.0.0.0:0");
    let work = c.path("").parent().unwrap().to_path_buf();
    let _guard = Guard { dir: work.clone(), bridge: "cftbr2", nat: "10.79.0.1/24", domains: &[], vms: &["vmp"] };
    let tdir = work.join("template");
    fs::create_dir_all(&tdir).unwrap();
    let t = template_with(&tdir, Some(&c.secret_file())).replace("\"mem\":\"256M\"", "\"mem\":\"512M\"");
    assert_eq!(c.write("vms/templates/default", t.as_bytes()), Ok(()), "{}", c.read("vms/error"));
    let port = c.addr().rsplit(':').next().unwrap().to_string();
    let spec = format!(r#"{{"name":"vmp","append":"agent=10.79.0.1:{port} vmname=vmp"}}"#);
    assert_eq!(c.write("vms/new", spec.as_bytes()), Ok(()), "{}", c.read("vms/error"));
    wait_console(&c, "vmp", "CLUSTERFS-AGENT-STARTED", 120);
    let joined = eventually(Duration::from_secs(120), || c.read("nodes/up").contains("vmp"));
    assert!(
        joined,
        "the VM never joined; nodes/up {:?}; console {:?}",
        c.read("nodes/up"),
        c.try_read("vms/vmp/console")
    );
    // A multi-node job reaches it like any node.
    let (code, out, err) = sh_as(
        "root",
        &format!(
            "exec 3<>{new}; printf '#CLUSTER nodes=cn1,vmp\\nhostname; uname -r\\n' >&3; read id <&3; cat {jobs}/$id/wait >/dev/null; cat {jobs}/$id/nodes/vmp/stdout",
            new = c.path("jobs/new").display(),
            jobs = c.path("jobs").display()
        ),
    );
    assert_eq!(code, 0, "{err}");
    let kernel = fs::read_dir("/boot")
        .unwrap()
        .flatten()
        .find_map(|e| e.file_name().to_string_lossy().strip_prefix("vmlinuz-").map(str::to_string));
    assert_eq!(out, format!("vmp\n{}\n", kernel.unwrap()), "the job's output on the VM");
    fs::remove_dir(c.path("vms/vmp")).unwrap();
}

/// Two heads on one etcd: a VM the leader started keeps running when that head is SIGKILLed;
/// the next leader adopts it without starting it again, and converges it from then on.
#[test]
fn a_vm_outlives_its_leading_head_and_the_next_leader_keeps_it() {
    if !can_mount() {
        return;
    }
    let Some(etcd) = crate::etcd::Etcd::start(1) else { return };
    let shared = tempfile::tempdir().unwrap();
    let config = format!(
        "store = \"{}\"\nlease_ttl_s = 2\nshared_dir = \"{}\"\n[vms]\naccel = \"tcg\"\ndefault_template = \"tiny\"\n\
         shutdown_timeout_s = 3\nsubnet = \"10.80.0.0/24\"\nbridge = \"cftbr3\"\n",
        etcd.url("vms"),
        shared.path().display()
    );
    let mut a = Cluster::up_with("", 300, &config);
    let b = Cluster::up_with("", 300, &config);
    let work = a.path("").parent().unwrap().to_path_buf();
    let _guard = Guard { dir: work.clone(), bridge: "cftbr3", nat: "10.80.0.1/24", domains: &[], vms: &["vmf"] };
    let leader = format!("leader {} addr={}", crate::etcd::head_name(&a), a.addr());
    assert!(b.read("status").starts_with(&leader), "{}", b.read("status"));
    a.agent_on(&[], &format!("{},{}", a.addr(), b.addr()), &["--name", "vmnode"]);
    for c in [&a, &b] {
        assert!(eventually(Duration::from_secs(20), || c.read("nodes/up") == "vmnode\n"), "{}", c.read("nodes/up"));
    }
    let tdir = work.join("template");
    fs::create_dir_all(&tdir).unwrap();
    assert_eq!(a.write("vms/templates/tiny", template(&tdir).as_bytes()), Ok(()), "{}", a.read("vms/error"));
    // Made through the head that does not lead.
    let spec = r#"{"name":"vmf","node":"vmnode","restart":"always"}"#;
    assert_eq!(b.write("vms/new", spec.as_bytes()), Ok(()), "{}", b.read("vms/error"));
    wait_state(&a, "vmf", "running on vmnode", 60);
    let vm_dir = work.join("agents/vmnode/vms/vmf");
    let pid = qemu_pid(&vm_dir).expect("vmf's qemu runs");

    a.crash_head();
    let took = crate::etcd::write_when_led(&b, "groups/after", b"vmnode\n");
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    assert!(eventually(Duration::from_secs(20), || b.read("nodes/up") == "vmnode\n"), "{}", b.read("nodes/up"));
    wait_state(&b, "vmf", "running on vmnode", 30);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(qemu_pid(&vm_dir), Some(pid), "the VM was started again after its leader died");
    let made: Vec<_> = fs::read_dir(work.join("agents/vmnode/vms")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(made, ["vmf"], "one clone, not two");
    // The new leader converges it: killed, it is started again (restart=always).
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let restarted = eventually(Duration::from_secs(30), || qemu_pid(&vm_dir).is_some_and(|p| p != pid));
    assert!(restarted, "vmf was not restarted by the new leader: {}", b.read("vms/vmf/state"));
    wait_state(&b, "vmf", "running on vmnode", 20);
    // And removed through it: the qemu and the clone go.
    fs::remove_dir(b.path("vms/vmf")).unwrap();
    let gone = eventually(Duration::from_secs(30), || qemu_pid(&vm_dir).is_none() && !vm_dir.exists());
    assert!(gone, "vmf stayed: {:?}", b.try_read("vms/vmf/state"));
}
