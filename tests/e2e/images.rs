//! images/: placement over volumes, spares, mount leases, growth, health — real loop devices and ext4.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use crate::harness::{Cluster, eventually, sh, sh_as};
use crate::jobs::{assert_killed, assert_running, submit_as, users, wait};

/// Two volume directories and a mount root; dropping it unmounts and detaches whatever a
/// failed test left under them.
pub struct Volumes {
    dir: tempfile::TempDir,
}

impl Volumes {
    pub fn new() -> Volumes {
        let dir = tempfile::Builder::new().prefix("clusterfs-images").tempdir().expect("tempdir");
        for d in ["vol01", "vol02", "mnt"] {
            std::fs::create_dir(dir.path().join(d)).expect("volume dir");
        }
        Volumes { dir }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The `[images]` table: vol01 twice the quota of vol02.
    pub fn config(&self, extra: &str) -> String {
        format!(
            "[images]\ndefault_size = \"64M\"\nmount_root = \"{}\"\nhealth_interval_s = 1\n{extra}\n\
             [images.volumes.vol01]\npath = \"{}\"\ncapacity = \"6400M\"\n\
             [images.volumes.vol02]\npath = \"{}\"\ncapacity = \"3200M\"\n\
             [images.teams]\nlab = [\"cfalice\"]\n",
            self.path("mnt").display(),
            self.path("vol01").display(),
            self.path("vol02").display()
        )
    }

    /// Loop devices backing files under these volumes.
    pub fn loops(&self) -> Vec<(String, String)> {
        let root = self.dir.path().to_string_lossy().to_string();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/sys/block").expect("sysfs").flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Ok(file) = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
                && file.starts_with(&root)
            {
                out.push((format!("/dev/{name}"), file.trim().to_string()));
            }
        }
        out
    }

    /// Mount points under the mount root.
    fn mounts(&self) -> Vec<String> {
        let root = self.path("mnt").to_string_lossy().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(String::from))
            // The mount root itself is a bind the agent makes (shared, for jobs' namespaces).
            .filter(|m| m.starts_with(&root) && *m != root)
            .collect()
    }

    pub fn is_mounted(&self, user: &str) -> bool {
        self.mounts().contains(&self.path("mnt").join(user).to_string_lossy().to_string())
    }
}

impl Drop for Volumes {
    fn drop(&mut self) {
        for m in self.mounts() {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        for (dev, _) in self.loops() {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
        let _ = nix::mount::umount2(&self.path("mnt"), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Ten users for placement, besides cfalice and cfbob.
fn image_users() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        users();
        for n in 0..10 {
            let u = format!("cfimg{n}");
            if !Command::new("id").arg(&u).output().is_ok_and(|o| o.status.success()) {
                assert!(Command::new("useradd").args(["-M", &u]).status().unwrap().success(), "useradd {u}");
            }
        }
    });
}

fn key(text: &str, k: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{k} ")))
        .unwrap_or_else(|| panic!("no {k} in {text}"))
        .to_string()
}

#[test]
fn placement_picks_the_emptier_volume_and_stays_balanced() {
    if !crate::can_mount() {
        return;
    }
    image_users();
    let v = Volumes::new();
    let c = Cluster::up_with("cn0", 200, &v.config("spares = 0"));
    let mut placed = Vec::new();
    for n in 0..10 {
        assert_eq!(c.write("images/new", format!("user=cfimg{n}\n").as_bytes()), Ok(()), "{}", c.read("images/error"));
        placed.push(c.read(&format!("images/cfimg{n}/volume")).trim().to_string());
        // Never more than one image's share apart: 64M is 1% of vol01 and 2% of vol02.
        let pct = |vol: &str| key(&c.read(&format!("images/volumes/{vol}")), "assigned_pct").parse::<f64>().unwrap();
        assert!((pct("vol01") - pct("vol02")).abs() <= 2.0, "unbalanced after {n}: {placed:?}");
    }
    assert_eq!(&placed[..3], ["vol01", "vol02", "vol01"]);
    assert_eq!(placed.iter().filter(|p| *p == "vol01").count(), 7, "{placed:?}");
    let vol01 = c.read("images/volumes/vol01");
    assert_eq!(key(&vol01, "images"), "7");
    assert_eq!(key(&vol01, "assigned"), ((7u64 * 64) << 20).to_string());
    assert_eq!(key(&vol01, "capacity"), (6400u64 << 20).to_string());
    // Each image is a real, sparse ext4 file owned by its user.
    let img = v.path("vol02/cfimg1.img");
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 < 64 << 20, "sparse");
    assert_eq!(sh("id -u cfimg1").1.trim(), meta.uid().to_string());
    assert_eq!(c.read("images/cfimg1/path"), format!("{}\n", img.display()));
    let (_, out, _) = sh(&format!("debugfs -R 'stat <2>' {} 2>/dev/null | grep -o 'User: *[0-9]*'", img.display()));
    assert_eq!(out.split_whitespace().last().unwrap(), meta.uid().to_string(), "the filesystem root is the user's");
    // bill: cfalice's team has nothing; the ten are billed to "-".
    let bill = c.read("images/bill");
    assert!(bill.starts_with("team images assigned used\nlab 0 0 0\n- 10 "), "{bill}");
    assert_eq!(c.read("images/cfimg1/size"), format!("{}\n", 64u64 << 20));
    assert!(v.loops().is_empty());
}

#[test]
fn a_template_seeds_a_new_image() {
    if !crate::can_mount() {
        return;
    }
    image_users();
    let v = Volumes::new();
    let seed = v.path("seed");
    std::fs::create_dir_all(seed.join("etc")).unwrap();
    std::fs::write(seed.join("etc/motd"), "from the template\n").unwrap();
    std::fs::create_dir(v.path("templates")).unwrap();
    let base = v.path("templates/base.img");
    let (code, _, err) =
        sh(&format!("truncate -s 32M {0} && mkfs.ext4 -F -q -d {1} {0}", base.display(), seed.display()));
    assert_eq!(code, 0, "{err}");
    let extra = format!("spares = 0\ntemplate_dir = \"{}\"", v.path("templates").display());
    let c = Cluster::up_with("cn0", 200, &v.config(&extra));
    assert_eq!(c.write("images/new", b"user=cfalice template=base size=48M\n"), Ok(()), "{}", c.read("images/error"));
    assert!(c.read("images/cfalice/state").contains("created on vol01, 48M (from a template)"));
    assert_eq!(c.write("images/new", b"user=cfbob template=base size=16M\n"), Err(libc::EINVAL));
    assert!(c.read("images/error").contains("smaller than the template"), "{}", c.read("images/error"));
    assert_eq!(c.write("images/new", b"user=cfbob template=nope\n"), Err(libc::EINVAL));
    assert!(c.read("images/error").contains("there is no template nope"));
    assert_eq!(c.write("images/cfalice/ctl", b"mount\n"), Ok(()), "{}", c.read("images/cfalice/error"));
    let at = v.path("mnt/cfalice");
    assert_eq!(std::fs::read_to_string(at.join("etc/motd")).unwrap(), "from the template\n");
    let (_, df, _) = sh(&format!("df -B1M --output=size {} | tail -1", at.display()));
    assert!(df.trim().parse::<u64>().unwrap() > 32, "grown past the 32M template: df says {df}");
    let (code, _, err) = sh_as("cfalice", &format!("touch {}/mine", at.display()));
    assert_eq!(code, 0, "the root of a template image is the user's: {err}");
    assert_eq!(c.write("images/cfalice/ctl", b"umount\n"), Ok(()));
    assert!(v.loops().is_empty() && v.mounts().is_empty());
}

#[test]
fn spares_mounts_leases_and_growth() {
    if !crate::can_mount() {
        return;
    }
    image_users();
    let v = Volumes::new();
    let mut c = Cluster::up_with("cn[0-1]", 200, &v.config("spares = 1"));
    assert!(eventually(Duration::from_secs(20), || key(&c.read("images/volumes/vol01"), "spares") == "1"));
    // mkdir as the user takes the spare, which is made again in the background.
    let (code, _, err) = sh_as("cfalice", &format!("mkdir {}", c.path("images/cfalice").display()));
    assert_eq!(code, 0, "{err}");
    let state = c.read("images/cfalice/state");
    assert!(state.starts_with("unmounted\n") && state.contains("created on vol01, 64M (from a spare)"), "{state}");
    assert!(eventually(Duration::from_secs(20), || key(&c.read("images/volumes/vol01"), "spares") == "1"));
    let meta = std::fs::metadata(c.path("images/cfalice")).unwrap();
    assert_eq!(meta.uid().to_string(), sh("id -u cfalice").1.trim());

    // Another user may not touch it.
    let ctl = c.path("images/cfalice/ctl");
    let (code, _, err) = sh_as("cfbob", &format!("echo 'mount cn1' > {}", ctl.display()));
    assert_ne!(code, 0);
    assert!(err.contains("Permission denied"), "{err}");

    // Mount on a chosen node; the user writes through the mount.
    let (code, _, err) = sh_as("cfalice", &format!("echo 'mount cn1' > {}", ctl.display()));
    assert_eq!(code, 0, "{err}");
    assert_eq!(c.read("images/cfalice/node"), "cn1\n");
    let at = v.path("mnt/cfalice");
    assert_eq!(c.read("images/cfalice/mountpoint"), format!("{}\n", at.display()));
    assert!(c.read("images/cfalice/state").starts_with("mounted on cn1\n"));
    assert!(v.is_mounted("cfalice"));
    assert_eq!(v.loops().len(), 1);
    let (code, _, err) = sh_as("cfalice", &format!("echo kept > {}/notes && sync", at.display()));
    assert_eq!(code, 0, "{err}");
    let root = std::fs::metadata(&at).unwrap();
    assert_eq!((root.uid(), root.mode() & 0o7777), (meta.uid(), 0o700), "the image's root is alice's alone");
    let (code, _, _) = sh_as("cfbob", &format!("ls {}", at.display()));
    assert_ne!(code, 0, "bob cannot list alice's image");
    // Jobs started now hold a copy of the mount in mount namespaces of their own: one works in
    // the image, one does not touch it.
    let busy = submit_as(&c, "cfalice", &format!("#CLUSTER nodes=cn1 cwd={}\nsleep 301\n", at.display()));
    let idle = submit_as(&c, "cfalice", "#CLUSTER nodes=cn1 cwd=/\nsleep 302\n");
    assert_running(&c, busy);
    assert_running(&c, idle);

    // Never twice, never removed while mounted.
    assert_eq!(c.write("images/cfalice/ctl", b"mount cn0\n"), Err(libc::EBUSY));
    assert!(c.read("images/cfalice/error").contains("mounted on cn1"), "{}", c.read("images/cfalice/error"));
    let rm = std::fs::remove_dir(c.path("images/cfalice")).unwrap_err();
    assert_eq!(rm.raw_os_error(), Some(libc::EBUSY));

    // The lease outlives a head crash.
    c.crash_head();
    c.start_head();
    assert!(c.read("images/cfalice/state").starts_with("mounted on cn1\n"));
    assert_eq!(c.write("images/cfalice/ctl", b"mount cn0\n"), Err(libc::EBUSY));

    // Grow while mounted: online where the kernel permits it (CAP_SYS_RESOURCE), else the
    // filesystem follows at the next mount; the image file grows at once either way.
    assert_eq!(c.write("images/cfalice/ctl", b"resize +64M\n"), Ok(()), "{}", c.read("images/cfalice/error"));
    assert_eq!(c.read("images/cfalice/size"), format!("{}\n", 128u64 << 20));
    assert_eq!(std::fs::metadata(v.path("vol01/cfalice.img")).unwrap().len(), 128 << 20);
    let state = c.read("images/cfalice/state");
    assert!(state.contains("grown to 128M online on cn1") || state.contains("grows at the next mount"), "{state}");
    assert_eq!(c.write("images/cfalice/ctl", b"resize 64M\n"), Err(libc::EINVAL));
    assert!(c.read("images/cfalice/error").contains("only grow"));

    // The node's umount reaches the jobs' copies: refused while a job works in the image...
    assert_eq!(c.write("images/cfalice/ctl", b"umount\n"), Err(libc::EBUSY));
    assert!(c.read("images/cfalice/error").contains("in use on this node"), "{}", c.read("images/cfalice/error"));
    assert!(c.read("images/cfalice/state").starts_with("mounted on cn1\n"));
    c.write(&format!("jobs/{busy}/ctl"), b"kill\n").unwrap();
    assert_killed(&wait(&c, busy));
    // ...and, once none does, done in every job's copy too: the loop device is free, and the
    // image is mounted nowhere while the head says it is unmounted.
    assert_eq!(c.write("images/cfalice/ctl", b"umount\n"), Ok(()), "{}", c.read("images/cfalice/error"));
    assert!(!v.is_mounted("cfalice"));
    assert!(v.loops().is_empty(), "{:?}", v.loops());
    // The idle job's process (any of them, should a second one match), as the host sees it.
    let (_, pids, _) = sh("pgrep -xf 'sleep 302'");
    let seen = pids.lines().find_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok());
    let state = c.read(&format!("jobs/{idle}/state"));
    let seen = seen.unwrap_or_else(|| panic!("no process of job {idle} ({state:?}); pgrep gave {pids:?}"));
    assert!(!seen.contains(&format!(" {} ", at.display())), "the job still has the image mounted:\n{seen}");
    c.write(&format!("jobs/{idle}/ctl"), b"kill\n").unwrap();
    assert_killed(&wait(&c, idle));
    assert_eq!(c.read("images/cfalice/node"), "\n");
    assert_eq!(c.write("images/cfalice/ctl", b"umount\n"), Err(libc::EINVAL));
    assert_eq!(c.write("images/cfalice/ctl", b"fsck\n"), Ok(()));
    assert!(c.read("images/cfalice/state").contains("fsck: clean"));
    let (code, _, err) = sh_as("cfalice", &format!("echo mount > {}", ctl.display()));
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_to_string(at.join("notes")).unwrap(), "kept\n");
    let (_, df, _) = sh(&format!("df -B1M --output=size {} | tail -1", at.display()));
    assert!(df.trim().parse::<u64>().unwrap() > 100, "the filesystem grew: df says {df}");
    let usage = c.read("images/cfalice/usage");
    assert_eq!(key(&usage, "size"), (128u64 << 20).to_string());
    assert!(eventually(Duration::from_secs(10), || key(&c.read("images/cfalice/usage"), "used") != "-"));
    assert_eq!(c.write("images/cfalice/ctl", b"umount\n"), Ok(()));
    let bill = c.read("images/bill");
    assert!(bill.contains(&format!("lab 1 {} ", 128u64 << 20)), "{bill}");

    // rmdir removes the image and its file.
    let (code, _, err) = sh_as("cfalice", &format!("rmdir {}", c.path("images/cfalice").display()));
    assert_eq!(code, 0, "{err}");
    assert!(!v.path("vol01/cfalice.img").exists());
    assert!(c.try_read("images/cfalice/state").is_none());
    assert!(v.loops().is_empty() && v.mounts().is_empty());
}

#[test]
fn ghost_loops_and_missing_mounts_are_repaired() {
    if !crate::can_mount() {
        return;
    }
    image_users();
    let v = Volumes::new();
    let mut c = Cluster::up_with("cn0", 200, &v.config("spares = 0"));
    assert_eq!(c.write("images/new", b"user=cfbob size=32M\n"), Ok(()), "{}", c.read("images/error"));
    let img = v.path("vol01/cfbob.img");
    // A loop device attached by hand, never mounted, is a ghost: found and detached.
    let (code, dev, err) = sh(&format!("losetup -f --show {}", img.display()));
    assert_eq!(code, 0, "{err}");
    assert!(eventually(Duration::from_secs(15), || v.loops().is_empty()), "{:?}", v.loops());
    let ghost = format!("ghost loop device {} on cn0 detached", dev.trim());
    assert!(
        eventually(Duration::from_secs(15), || c.read("images/cfbob/state").contains(&ghost)),
        "{}",
        c.read("images/cfbob/state")
    );

    // An unclean image with damage is repaired by fsck before it is mounted.
    let (code, _, err) =
        sh(&format!("debugfs -w -R 'sif <2> links_count 7' {0} && debugfs -w -R 'ssv state 0' {0}", img.display()));
    assert_eq!(code, 0, "{err}");
    assert_eq!(c.write("images/cfbob/ctl", b"mount cn0\n"), Ok(()), "{}", c.read("images/cfbob/error"));
    assert!(c.read("images/cfbob/state").contains("after fsck repaired it"), "{}", c.read("images/cfbob/state"));
    assert_eq!(c.write("images/cfbob/ctl", b"umount\n"), Ok(()));

    // Mounted on a node whose agent is then killed and the mount lost (as after a reboot).
    let ext = c.agent("ext1");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn0,ext1\n"));
    assert_eq!(c.write("images/cfbob/ctl", b"mount ext1\n"), Ok(()), "{}", c.read("images/cfbob/error"));
    c.kill_agent(ext);
    assert!(v.is_mounted("cfbob"), "a mount outlives its agent");
    let at = v.path("mnt/cfbob");
    let (code, _, err) = sh(&format!(
        "umount {} && for d in $(losetup -j {} | cut -d: -f1); do losetup -d $d; done",
        at.display(),
        img.display()
    ));
    assert_eq!(code, 0, "{err}");
    let ext = c.agent("ext1");
    assert!(eventually(Duration::from_secs(20), || v.is_mounted("cfbob")), "{}", c.read("images/cfbob/state"));
    let state = c.read("images/cfbob/state");
    assert!(
        state.starts_with("mounted on ext1\n") && state.contains("missing mount on ext1: mounting it again"),
        "{state}"
    );

    // kill -9 while mounted, then back: the state still matches and nothing leaks.
    c.kill_agent(ext);
    c.agent("ext1");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn0,ext1\n"));
    std::thread::sleep(Duration::from_millis(2500));
    assert!(c.read("images/cfbob/state").starts_with("mounted on ext1\n"));
    assert_eq!(v.loops().len(), 1, "no ghost besides the mounted one");
    assert_eq!(c.write("images/cfbob/ctl", b"umount\n"), Ok(()), "{}", c.read("images/cfbob/error"));
    assert!(v.loops().is_empty() && v.mounts().is_empty());
}

#[test]
fn bad_image_requests_change_nothing() {
    if !crate::can_mount() {
        return;
    }
    image_users();
    let v = Volumes::new();
    let c = Cluster::up_with("cn0", 200, &v.config("spares = 0"));
    let before = c.read("images/volumes/vol01");
    let refused = |spec: &str, errno: i32, says: &str| {
        assert_eq!(c.write("images/new", spec.as_bytes()), Err(errno), "{spec}");
        let e = c.read("images/error");
        assert!(e.contains(says), "{spec}: {e}");
    };
    refused("user=../x\n", libc::EINVAL, "EINVAL");
    refused("user=root/..\n", libc::EINVAL, "EINVAL");
    refused(&format!("user={}\n", "a".repeat(300)), libc::EINVAL, "at most");
    refused("user=nosuchuser\n", libc::EINVAL, "there is no user nosuchuser");
    refused("user=cfalice size=10X\n", libc::EINVAL, "not a size");
    refused("user=cfalice size=0\n", libc::EINVAL, "too small");
    refused("user=cfalice size=1M\n", libc::EINVAL, "too small");
    refused("user=cfalice size=20T\n", libc::EINVAL, "too large");
    refused("user=cfalice size=7G\n", libc::ENOSPC, "no volume has room for a 7G image");
    refused("user=cfalice template=base\n", libc::EINVAL, "no templates are configured");
    refused("user=cfalice color=red\n", libc::EINVAL, "unknown key");
    let long = c.path(&format!("images/{}", "b".repeat(300)));
    assert!(std::fs::create_dir(&long).is_err());
    // A user may make only their own image.
    let (code, _, err) = sh_as("cfbob", &format!("mkdir {}", c.path("images/cfalice").display()));
    assert_ne!(code, 0);
    assert!(err.contains("Permission denied"), "{err}");
    let (code, _, err) = sh_as("cfbob", &format!("echo user=cfalice > {}", c.path("images/new").display()));
    assert_ne!(code, 0, "{err}");
    // Nothing was made anywhere.
    assert_eq!(c.read("images/volumes/vol01"), before);
    assert_eq!(std::fs::read_dir(v.path("vol01")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(v.path("vol02")).unwrap().count(), 0);
    let listed: Vec<String> =
        std::fs::read_dir(c.path("images")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert!(!listed.iter().any(|n| n.starts_with("cf") || n == "nosuchuser"), "{listed:?}");
    // Bad verbs and sizes on an image change nothing either.
    assert_eq!(c.write("images/new", b"user=cfalice\n"), Ok(()));
    for (cmd, errno) in [
        ("resize\n", libc::EINVAL),
        ("resize big\n", libc::EINVAL),
        ("resize +0\n", libc::EINVAL),
        ("resize 100G\n", libc::ENOSPC),
        ("mount nosuchnode\n", libc::EINVAL),
        ("mount a b\n", libc::EINVAL),
        ("explode\n", libc::EINVAL),
        ("umount\n", libc::EINVAL),
    ] {
        assert_eq!(c.write("images/cfalice/ctl", cmd.as_bytes()), Err(errno), "{cmd}");
        if cmd == "explode\n" {
            assert!(c.read("images/cfalice/error").contains("images/<user>/ctl takes"));
        }
    }
    assert_eq!(c.read("images/cfalice/size"), format!("{}\n", 64u64 << 20));
    assert!(c.read("images/cfalice/state").starts_with("unmounted\n"));
    assert!(Path::new(&v.path("vol01/cfalice.img")).exists());
    assert!(v.loops().is_empty());
    // A growth smaller than the smallest image is a growth all the same.
    assert_eq!(c.write("images/cfalice/ctl", b"resize +8M\n"), Ok(()), "{}", c.read("images/cfalice/error"));
    assert_eq!(c.read("images/cfalice/size"), format!("{}\n", 72u64 << 20));
}
