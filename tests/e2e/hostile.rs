//! Hostile input: every writable file and every directory that makes objects gets bad bytes
//! and bad names; each is refused with an errno and a sentence, and nothing changes.

use std::fs;
use std::time::Duration;

use crate::can_mount;
use crate::harness::{Cluster, eventually, sh};

/// What the tree shows of its objects: it must read the same after every refusal.
fn snapshot(c: &Cluster) -> Vec<(String, String)> {
    let list = |d: &str| {
        let mut v: Vec<String> =
            fs::read_dir(c.path(d)).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v.join(" ")
    };
    let mut out: Vec<(String, String)> = ["jobs", "groups", "images", "hsm", "vms", "vms/templates", "nodes"]
        .iter()
        .map(|d| (d.to_string(), list(d)))
        .collect();
    for f in ["groups/g1", "nodes/cn1/state", "hsm/status"] {
        out.push((f.to_string(), c.read(f)));
    }
    out
}

#[test]
fn bad_bytes_and_bad_names_are_refused_everywhere_and_change_nothing() {
    if !can_mount() {
        return;
    }
    let c = Cluster::up("cn1", 200);
    assert_eq!(c.write("groups/g1", b"cn1\n"), Ok(()));
    // A job that stays queued (it waits on one that never ends) gives a ctl to attack.
    let (rc, id, err) = sh(&format!(
        "exec 3<>{}; printf '#CLUSTER after=999999\\ntrue\\n' >&3; read id <&3; echo $id",
        c.path("jobs/new").display()
    ));
    assert_eq!(rc, 0, "{err}");
    let id = id.trim().to_string();
    assert!(eventually(Duration::from_secs(15), || c.read("jobs/queue").contains(&id)));
    let before = snapshot(&c);

    let huge = vec![b'x'; (2 << 20) + 1];
    let bytes: Vec<(&str, Vec<u8>)> = vec![
        ("NUL bytes", b"\0\0\0\n".to_vec()),
        ("binary", vec![0xff, 0xfe, 0x00, 0x81, b'\n']),
        ("partial UTF-8", b"kill \xe2\x82\n".to_vec()),
        ("2 MiB", huge),
    ];
    let job_ctl = format!("jobs/{id}/ctl");
    let files = [
        "jobs/new",
        job_ctl.as_str(),
        "nodes/cn1/ctl",
        "groups/g1",
        "images/new",
        "hsm/queue",
        "hsm/ctl",
        "vms/new",
        "vms/templates/t1",
    ];
    for file in files {
        for (what, data) in &bytes {
            let got = c.write(file, data);
            assert!(got.is_err(), "{file} took {what}");
            let dir = file.rsplit_once('/').map_or("", |(d, _)| d);
            let err = c.read(&format!("{dir}/error"));
            assert!(err.contains(": ") && err.len() > 10, "{file} with {what}: no sentence in error: {err:?}");
            assert!(c.try_read("version").is_some(), "the head died on {file} with {what}");
        }
    }
    // An empty write (`: > file`) is no command: whatever it answers, it changes nothing.
    for file in files {
        let _ = c.write(file, b"");
    }
    // Each verb with wrong arguments.
    for (file, bad) in [
        (job_ctl.as_str(), "kill now"),
        (job_ctl.as_str(), "signal NOPE"),
        (job_ctl.as_str(), "signal"),
        (job_ctl.as_str(), "explode"),
        ("nodes/cn1/ctl", "resume please"),
        ("nodes/cn1/ctl", "reboot"),
        ("hsm/ctl", "drain"),
        ("hsm/ctl", "cancel notacookie"),
        ("hsm/ctl", "lock now"),
        ("vms/new", "{\"name\":\"../x\"}"),
        ("vms/new", "{\"name\":\"-rf\"}"),
        ("vms/templates/t1", "{\"disk\":\"../../etc/passwd\"}"),
        ("images/new", "user=../../root"),
        ("images/new", "user=-rf size=1G"),
        ("groups/g1", "cn[1-"),
    ] {
        assert!(c.write(file, bad.as_bytes()).is_err(), "{file} took {bad:?}");
    }
    // 4 KiB names inside verbs.
    let name4k = "a".repeat(4096);
    for (file, bad) in [
        ("images/new", format!("user={name4k}")),
        ("vms/new", format!("{{\"name\":\"{name4k}\"}}")),
        ("hsm/ctl", format!("lock {name4k}")),
        ("groups/g1", format!("{name4k}\n")),
    ] {
        assert!(c.write(file, bad.as_bytes()).is_err(), "{file} took a 4 KiB name");
    }
    // Path tricks in every name that makes an object, up to 4 KiB names (the kernel refuses
    // those over 255 bytes with ENAMETOOLONG before the head sees them).
    let long = "a".repeat(255);
    for dir in ["images", "vms", "groups"] {
        for name in ["..", "-rf", "README", "error", "new", long.as_str(), name4k.as_str(), "a b", "x\\y"] {
            let p = c.path(dir).join(name);
            let made = if dir == "groups" { fs::write(&p, b"cn1\n").is_ok() } else { fs::create_dir(&p).is_ok() };
            assert!(!made || name == "..", "{dir}/{name:?} was made");
        }
    }
    let after = snapshot(&c);
    for (b, a) in before.iter().zip(&after) {
        if b.0 == "hsm/status" || b.0 == "nodes/cn1/state" {
            continue;
        }
        assert_eq!(b, a, "{} changed", b.0);
    }
    assert_eq!(c.read("groups/g1"), "cn1\n");
    assert!(c.read("nodes/cn1/state").starts_with("up"));
    assert!(c.read("hsm/status").contains("archive queued 0 running 0"));
}

#[test]
fn an_unprivileged_user_is_refused_every_privileged_action_and_changes_nothing() {
    if !can_mount() {
        return;
    }
    crate::jobs::users();
    let c = Cluster::up("cn1", 200);
    assert_eq!(c.write("groups/g1", b"cn1\n"), Ok(()));
    assert_eq!(c.write("vms/templates/t1", b"{\"disk\":\"/nonexistent.qcow2\"}\n"), Ok(()));
    // root's job, kept queued: the one node is drained.
    c.write("nodes/cn1/ctl", b"drain kept\n").unwrap();
    let root_job = crate::jobs::submit_as(&c, "root", "true\n").to_string();
    // Once its writer has closed: queued, not writing.
    let queued = format!("{root_job} root queued");
    assert!(eventually(Duration::from_secs(15), || c.read("jobs/queue").contains(&queued)), "{}", c.read("jobs/queue"));
    let before = snapshot(&c);
    let queue = c.read("jobs/queue");
    let template = c.read("vms/templates/t1");
    let m = c.mnt.display();
    let j = format!("{m}/jobs/{root_job}");
    for (what, script) in [
        ("drain a node", format!("echo 'drain mine' > {m}/nodes/cn1/ctl")),
        ("set a group", format!("echo cn1 > {m}/groups/g1")),
        ("make a group", format!("echo cn1 > {m}/groups/g2")),
        ("remove a group", format!("rm {m}/groups/g1")),
        (
            "queue HSM requests",
            format!("echo '{{\"action\":\"ARCHIVE\",\"fid\":\"[0x200000401:0x1:0x0]\",\"cookie\":1}}' > {m}/hsm/queue"),
        ),
        ("lock the HSM coordinator", format!("echo lock > {m}/hsm/ctl")),
        ("write a VM template", format!("echo '{{}}' > {m}/vms/templates/t1")),
        ("make a VM template", format!("echo '{{}}' > {m}/vms/templates/t2")),
        ("make another user's image", format!("echo 'user=cfalice' > {m}/images/new")),
        ("kill root's job", format!("echo kill > {j}/ctl")),
        ("remove root's job", format!("rmdir {j}")),
        ("read root's job output", format!("cat {j}/stdout")),
        ("raise a job's priority", format!("printf '#CLUSTER priority=5\\ntrue\\n' > {m}/jobs/new")),
    ] {
        let (rc, _, err) = crate::harness::sh_as("cfbob", &script);
        assert_ne!(rc, 0, "cfbob could {what}");
        assert!(
            err.contains("Permission denied") || err.contains("Operation not permitted"),
            "{what}: refused with something else than EACCES or EPERM: {err}"
        );
    }
    assert_eq!(snapshot(&c), before, "an unprivileged user changed the tree");
    assert_eq!(c.read("jobs/queue"), queue);
    assert_eq!(c.read("groups/g1"), "cn1\n");
    assert_eq!(c.read("vms/templates/t1"), template);
}

#[test]
fn a_truncated_or_corrupt_store_stops_the_head_with_a_reason_instead_of_starting_empty() {
    if !can_mount() {
        return;
    }
    let mut c = Cluster::up("cn1", 200);
    assert_eq!(c.write("groups/g1", b"cn1\n"), Ok(()));
    c.crash_head();
    let store = c.state.join("store.redb");
    let good = fs::read(&store).unwrap();
    let damaged: [(&str, Vec<u8>); 2] = [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("overwritten", good.iter().enumerate().map(|(i, b)| if i % 512 < 64 { 0x5a } else { *b }).collect()),
    ];
    for (what, bytes) in damaged {
        fs::write(&store, &bytes).unwrap();
        let out = std::process::Command::new(crate::harness::bin("clusterfs"))
            .arg("up")
            .arg(&c.mnt)
            .args(["--nodes", "cn1", "--listen", "127.0.0.1:0", "--state"])
            .arg(&c.state)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the head started on a {what} store");
        assert!(err.contains("refusing to start on a store that cannot be read"), "{what}: {err}");
        assert!(fs::read(&store).unwrap() == bytes, "the {what} store was changed by the refused start");
    }
    // Put back, the store serves what it held.
    fs::write(&store, &good).unwrap();
    c.start_head();
    assert_eq!(c.read("groups/g1"), "cn1\n");
}

/// Writes `data` with one write(2) and closes: the errno of the write, or of the close
/// (where a write's changes are made durable).
fn write_and_close(path: &std::path::Path, data: &[u8]) -> Result<(), i32> {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| e.raw_os_error().unwrap_or(0))?;
    f.write_all(data).map_err(|e| e.raw_os_error().unwrap_or(0))?;
    nix::unistd::close(f.into_raw_fd()).map_err(|e| e as i32)
}

/// Unmounts the small file system the head's state was moved to.
struct SmallDisk(std::path::PathBuf);

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_on_the_head_refuses_writes_with_enospc_reads_go_on_and_writes_come_back() {
    if !can_mount() {
        return;
    }
    let mut c = Cluster::up("cn1", 200);
    c.stop_head();
    // The head's state moves to a 32 MiB file system.
    let saved = c.state.with_extension("saved");
    let ok = |cmd: &str| sh(cmd).0 == 0;
    assert!(ok(&format!("cp -a {s} {d}", s = c.state.display(), d = saved.display())));
    assert!(ok(&format!("mount -t tmpfs -o size=32m clusterfs-test {}", c.state.display())));
    let _disk = SmallDisk(c.state.clone());
    assert!(ok(&format!("cp -a {}/. {}/", saved.display(), c.state.display())));
    c.start_head();
    assert_eq!(c.write("groups/g1", b"cn1\n"), Ok(()));
    let filler = c.state.join("filler");
    let _ = sh(&format!("dd if=/dev/zero of={} bs=1M 2>/dev/null", filler.display()));
    // The store's file may still have free pages of its own: those commits land, durably.
    let room = (0..200).position(|i| write_and_close(&c.path(&format!("groups/room{i}")), b"cn1\n").is_err());
    assert!(room.is_some(), "200 groups stored on a full disk");

    for (file, data) in [("groups/g2", &b"cn1\n"[..]), ("jobs/new", &b"true\n"[..]), ("groups/g1", &b"cn1,cn1\n"[..])] {
        let got = write_and_close(&c.path(file), data);
        let dir = file.rsplit_once('/').unwrap().0;
        assert_eq!(got, Err(libc::ENOSPC), "{file}: {}", c.read(&format!("{dir}/error")));
        let err = c.read(&format!("{dir}/error"));
        assert!(err.starts_with("ENOSPC: ") && err.contains("No space left"), "{err}");
    }
    // The job whose record could not be stored never runs, and says why.
    let ids: Vec<String> = fs::read_dir(c.path("jobs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let state = c.read(&format!("jobs/{}/state", ids[0]));
    assert!(state.starts_with("failed not run: its record could not be stored"), "{state}");
    // Reads go on.
    assert!(c.read("nodes/cn1/sitrep").contains("name cn1"));
    assert_eq!(c.read("groups/g1"), "cn1\n");

    // Space back: writes work again, with no restart, and the store is whole after one.
    fs::remove_file(&filler).unwrap();
    let back = eventually(Duration::from_secs(10), || c.write("groups/g3", b"cn1\n").is_ok());
    assert!(back, "writes did not come back: {}", c.read("groups/error"));
    c.stop_head();
    c.start_head();
    assert_eq!(c.read("groups/g1"), "cn1\n");
    assert_eq!(c.read("groups/g3"), "cn1\n");
    assert!(!c.path("groups/g2").exists(), "a refused group was made");
}
