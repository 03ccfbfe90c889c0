//! DESIGN.md section 3 on the real mount: sizes, snapshots, control files, inodes, handles, readdir.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{Cluster, eventually, sh};

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn every_file_reports_its_true_size() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn[0-1]", 200);
    c.write("groups/g", b"cn[0-1]\n").unwrap();
    c.write("nodes/cn0/ctl", b"bogus").unwrap_err(); // something in an error file
    let mut files = Vec::new();
    walk(&c.mnt, &mut files);
    assert!(files.len() > 20, "{files:?}");
    for f in &files {
        // fstat on the open handle is the size of exactly what that handle reads.
        let mut h = fs::File::open(f).unwrap();
        let size = h.metadata().unwrap().len();
        let mut buf = Vec::new();
        h.read_to_end(&mut buf).unwrap();
        assert_eq!(size, buf.len() as u64, "{}", f.display());
        let name = f.file_name().unwrap().to_str().unwrap();
        if !["ping", "sitrep", "sitrep.json", "metrics", "error"].contains(&name) {
            assert!(size > 0 || ["jobs", "down", "drained"].contains(&name) || buf.is_empty(), "{}", f.display());
        }
    }
    // Path stat (what `stat -c %s` and NFS clients see) matches a read of stable files.
    for rel in ["README", "version", "nodes/all", "nodes/cn0/state", "nodes/cn0/README", "groups/g", "nodes/cn0/error"]
    {
        let (_, out, _) = sh(&format!("stat -c %s {0}; cat {0} | wc -c", c.path(rel).display()));
        let v: Vec<&str> = out.lines().collect();
        assert_eq!(v[0], v[1], "{rel}: stat says {} bytes, cat read {}", v[0], v[1]);
        assert_ne!(v[0], "0", "{rel} has content");
    }
}

#[test]
fn snapshot_is_taken_at_open() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    let mut h = fs::File::open(c.path("nodes/cn0/state")).unwrap();
    c.write("nodes/cn0/ctl", b"drain later").unwrap();
    let mut s = String::new();
    h.read_to_string(&mut s).unwrap();
    assert_eq!(s, "up\n", "the handle keeps what was true at open");
    assert_eq!(c.read("nodes/cn0/state"), "drained later\n", "a new open sees the change");
}

#[test]
fn control_files_accept_truncate_create_and_refuse_chmod() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    let ctl = c.path("nodes/cn0/ctl");
    let (rc, _, err) = sh(&format!("truncate -s 0 {0} && echo 'drain t' >> {0}", ctl.display()));
    assert_eq!(rc, 0, "{err}");
    assert_eq!(c.read("nodes/cn0/state"), "drained t\n");
    // After dropping caches the kernel sends CREATE for `>` on a name it no longer knows.
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let (rc, _, err) = sh(&format!("echo resume > {}", ctl.display()));
    assert_eq!(rc, 0, "{err}");
    assert_eq!(c.read("nodes/cn0/state"), "up\n");
    let (rc, _, _) = sh(&format!("truncate -s 5 {}", ctl.display()));
    assert_ne!(rc, 0);
    assert_eq!(c.read("nodes/cn0/error"), "EPERM: ctl: only control files may be truncated, and only to 0\n");
    let (rc, _, _) = sh(&format!("chmod 777 {}", ctl.display()));
    assert_ne!(rc, 0);
    assert!(c.read("nodes/cn0/error").starts_with("EPERM: "), "{}", c.read("nodes/cn0/error"));
    // A status file is read-only, even to root (whom the kernel lets open it for writing): the
    // open that would truncate it is refused, with the sentence.
    let (rc, _, _) = sh(&format!("echo x > {}", c.path("nodes/cn0/sitrep").display()));
    assert_ne!(rc, 0, "status files are read-only");
    let why = c.read("nodes/cn0/error");
    assert_eq!(why, "EPERM: sitrep: only control files may be truncated, and only to 0\n");
    let (rc, _, _) = sh(&format!("mkdir {}", c.path("nodes/cn0/x").display()));
    assert_ne!(rc, 0);
    // No extended attributes: a file system that keeps none says EOPNOTSUPP (the kernel then
    // stops asking for security.capability before each `>` truncates a control file).
    let (file, name) = (CString::new(ctl.as_os_str().as_bytes()).unwrap(), CString::new("user.x").unwrap());
    // SAFETY: two NUL-terminated strings, and no buffer (size 0 asks for the size only).
    let got = unsafe { libc::getxattr(file.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!((got, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::EOPNOTSUPP)));
    // Names are the tree's to give: mv, ln and ln -s are refused with EPERM and a sentence.
    let node = c.path("nodes/cn0");
    for (what, call) in [
        ("mv", fs::rename(node.join("state"), node.join("old"))),
        ("ln", fs::hard_link(node.join("state"), node.join("old"))),
        ("ln -s", std::os::unix::fs::symlink("/etc", node.join("old"))),
    ] {
        assert_eq!(call.map_err(|e| e.raw_os_error()), Err(Some(libc::EPERM)), "{what}");
        let err = c.read("nodes/cn0/error");
        assert!(err.starts_with("EPERM: old: ") || err.starts_with("EPERM: state: "), "{what}: {err:?}");
        assert!(err.contains("names in this tree stand for cluster objects"), "{what}: {err:?}");
    }
    assert_eq!(c.read("nodes/cn0/state"), "up\n", "the node's files are as they were");
    assert!(!node.join("old").exists());
}

#[test]
fn mounted_allow_other_default_permissions_with_several_fuse_threads() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    let mnt = c.mnt.to_string_lossy().to_string();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.split(' ').nth(4) == Some(mnt.as_str())).expect("mounted");
    assert!(line.contains("default_permissions") && line.contains("allow_other"), "{line}");
    // On the loop device of its state, so its identity outlives a restart.
    assert!(line.contains(" - fuseblk.clusterfs /dev/loop"), "{line}");
    let threads = fs::read_dir(format!("/proc/{}/task", c.head_pid()))
        .unwrap()
        .filter(|t| fs::read_to_string(t.as_ref().unwrap().path().join("comm")).is_ok_and(|n| n.starts_with("fuser-")))
        .count();
    assert!(threads >= 2, "{threads} FUSE threads");
    // Without a stable mount it is plain fuse, with the same options.
    let plain = Cluster::up_with("cn0", 200, "stable_mount = false\n");
    let mnt = plain.mnt.to_string_lossy().to_string();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.split(' ').nth(4) == Some(mnt.as_str())).expect("mounted");
    assert!(line.contains(" - fuse clusterfs ") && line.contains("allow_other"), "{line}");
    assert_eq!(plain.read("nodes/all"), "cn0\n");
}

/// How much `pgrep` prints for the cluster's agent processes (none: 0).
fn agents(c: &Cluster) -> usize {
    let pattern = format!("secret-file {}", c.secret_file().display());
    Command::new("pgrep").args(["-f", "--", &pattern]).output().map(|o| o.stdout.len()).unwrap_or(0)
}

#[test]
fn inodes_are_stable_across_a_crash_and_the_stale_mount_is_cleared() {
    if !crate::can_mount() {
        return;
    }
    let mut c = Cluster::up("cn[0-1]", 200);
    let paths = ["nodes", "nodes/cn1", "nodes/cn1/sitrep", "nodes/all", "groups", "README"];
    let before: Vec<u64> = paths.iter().map(|p| fs::metadata(c.path(p)).unwrap().ino()).collect();
    let mut uniq = before.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), before.len(), "distinct objects, distinct inodes");
    assert!(agents(&c) > 0, "the local agent runs");
    c.crash_head();
    assert!(eventually(Duration::from_secs(15), || agents(&c) == 0), "the local agent ends with its head");
    // Attributes may still be cached by the kernel; a listing must ask the dead daemon.
    let err = fs::read_dir(c.path("nodes/cn0")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "a crashed head leaves a stale mount");
    c.start_head();
    let after: Vec<u64> = paths.iter().map(|p| fs::metadata(c.path(p)).unwrap().ino()).collect();
    assert_eq!(before, after);
}

#[test]
fn a_head_whose_tree_is_unmounted_by_someone_else_stops_with_its_agent() {
    if !crate::can_mount() {
        return;
    }
    let mut c = Cluster::up("cn0", 200);
    assert!(agents(&c) > 0, "the local agent runs");
    let (rc, _, err) = sh(&format!("umount {}", c.path("").display()));
    assert_eq!(rc, 0, "{err}");
    let mut status = None;
    assert!(
        eventually(Duration::from_secs(15), || {
            status = c.head_exited();
            status.is_some()
        }),
        "the head went on"
    );
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert!(c.log().contains("unmounted by someone else: stopping"), "{}", c.log());
    assert!(eventually(Duration::from_secs(15), || agents(&c) == 0), "the local agent ends with its head");
    assert!(!c.is_mounted());
    // Started again on the same mountpoint, it serves as before.
    c.start_head();
    assert!(eventually(Duration::from_secs(15), || c.read("nodes/up") == "cn0\n"));
}

/// name_to_handle_at + open_by_handle_at: what an NFS server does with file handles.
fn handle_of(path: &Path) -> (Vec<u8>, i32) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 128 + 8];
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[] }
    buf[..4].copy_from_slice(&128u32.to_ne_bytes());
    let mut mount_id = 0;
    // SAFETY: buf is large enough for the header plus 128 handle bytes, as handle_bytes says.
    let rc = unsafe {
        libc::syscall(libc::SYS_name_to_handle_at, libc::AT_FDCWD, c.as_ptr(), buf.as_mut_ptr(), &mut mount_id, 0)
    };
    assert_eq!(rc, 0, "name_to_handle_at({}): {}", path.display(), std::io::Error::last_os_error());
    (buf, mount_id)
}

fn open_by_handle(mount_fd: i32, handle: &mut [u8]) -> std::io::Result<fs::File> {
    // SAFETY: handle holds a file_handle filled by name_to_handle_at.
    let fd = unsafe { libc::syscall(libc::SYS_open_by_handle_at, mount_fd, handle.as_mut_ptr(), libc::O_RDONLY) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is owned by nothing else.
    Ok(unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

#[test]
fn file_handles_resolve_after_drop_caches() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn[0-1]", 200);
    let root = fs::File::open(&c.mnt).unwrap();
    let mfd = std::os::fd::AsRawFd::as_raw_fd(&root);
    for rel in ["nodes/cn1/state", "nodes/all", "nodes/cn1"] {
        let (mut h, _) = handle_of(&c.path(rel));
        fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        let mut f = open_by_handle(mfd, &mut h).unwrap_or_else(|e| panic!("{rel}: {e}"));
        if rel != "nodes/cn1" {
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            assert_eq!(s, c.read(rel), "{rel}");
        }
    }
}

/// Reads a directory with libc, returning (name, telldir cookie after it).
fn listing(dir: &Path, start: Option<i64>) -> Vec<(String, i64)> {
    let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
    let mut out = Vec::new();
    // SAFETY: opendir/readdir/telldir/seekdir/closedir on one valid DIR*, used only here.
    unsafe {
        let d = libc::opendir(c.as_ptr());
        assert!(!d.is_null());
        if let Some(cookie) = start {
            libc::seekdir(d, cookie);
        }
        loop {
            let e = libc::readdir(d);
            if e.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr()).to_string_lossy().to_string();
            out.push((name, libc::telldir(d)));
        }
        libc::closedir(d);
    }
    out
}

#[test]
fn readdir_cookies_resume_on_a_new_open_even_after_changes() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn[0-9]", 200);
    let full = listing(&c.path("nodes"), None);
    let names: Vec<&str> = full.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(full.len(), 2 + 7 + 10, "{names:?}");
    // Resume after the k-th entry on a fresh opendir, as an NFS server does with cookies.
    for k in [2, 7, 12] {
        let rest = listing(&c.path("nodes"), Some(full[k].1));
        assert_eq!(
            rest.iter().map(|e| e.0.clone()).collect::<Vec<_>>(),
            full[k + 1..].iter().map(|e| e.0.clone()).collect::<Vec<_>>()
        );
    }
    // A group added between two pages neither repeats nor hides what was listed.
    let groups_before = listing(&c.path("groups"), None);
    let cookie = groups_before[2].1;
    c.write("groups/zz", b"cn1").unwrap();
    let rest = listing(&c.path("groups"), Some(cookie));
    let seen: Vec<String> = groups_before[..3].iter().chain(rest.iter()).map(|e| e.0.clone()).collect();
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), seen.len(), "no entry twice: {seen:?}");
    for name in ["README", "error"] {
        assert!(seen.contains(&name.to_string()), "{name} missing from {seen:?}");
    }
}

#[test]
fn dot_and_dotdot_resolve_everywhere() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    let ino = |p: &str| fs::metadata(c.path(p)).unwrap().ino();
    assert_eq!(ino("nodes/cn0/.."), ino("nodes"));
    assert_eq!(ino("nodes/cn0/."), ino("nodes/cn0"));
    assert_eq!(ino("nodes/.."), ino(""));
    assert!(eventually(Duration::from_secs(10), || c.path("groups/.").is_dir()));
}
