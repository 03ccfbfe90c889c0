//! The layer's rules without a kernel: sizes, snapshots, control answers, errors, cookies, inodes.

mod common;

use std::sync::Arc;

use clusterfs_fs::{Answer, Caller, Chattr, Config, Errno, ROOT_INO, SynthFs};
use common::Toy;

const ROOT: Caller = Caller::ROOT;
const ALICE: Caller = Caller { uid: 1000, gid: 1000, pid: 1 };

fn fs() -> Arc<SynthFs<Toy>> {
    SynthFs::new(Arc::new(Toy::default()), Config::default())
}

fn now<T>(a: Answer<T>) -> clusterfs_fs::Result<T> {
    match a {
        Answer::Now(r) => r,
        Answer::Later(_) => panic!("expected an immediate answer"),
    }
}

fn ino(fs: &SynthFs<Toy>, parent: u64, name: &str) -> u64 {
    fs.lookup(parent, name, &ROOT).unwrap().attr.ino.0
}

#[test]
fn snapshot_size_matches_what_open_reads() {
    let fs = fs();
    let snap = ino(&fs, ROOT_INO, "snap");
    let size = fs.getattr(snap, None, &ROOT).unwrap().0.size;
    let fh = now(fs.open(snap, false, &ROOT)).unwrap();
    let data = now(fs.read(fh, 0, 4096)).unwrap();
    assert_eq!(size, data.len() as u64);
    assert_eq!(data, b"render 0\n", "open reused the render stat just sized");
    // Reads slice the snapshot even when the source changes.
    assert_eq!(now(fs.read(fh, 7, 10)).unwrap(), b"0\n");
}

#[test]
fn a_snapshot_read_again_from_offset_zero_is_rendered_anew() {
    let fs = fs();
    let snap = ino(&fs, ROOT_INO, "snap");
    let fh = now(fs.open(snap, false, &ROOT)).unwrap();
    assert_eq!(now(fs.read_handle(fh, 0, 4096)).unwrap(), b"render 0\n");
    assert_eq!(now(fs.read_handle(fh, 7, 4096)).unwrap(), b"0\n", "a continued read slices the same render");
    // The file handle an NFS server keeps open and reads again for another client.
    std::thread::sleep(Config::default().file_ttl);
    assert_eq!(now(fs.read_handle(fh, 0, 4096)).unwrap(), b"render 1\n");
    assert_eq!(fs.getattr(snap, Some(fh), &ROOT).unwrap().0.size, 9);
}

#[test]
fn log_size_and_reads_are_live() {
    let fs = fs();
    let log = ino(&fs, ROOT_INO, "log");
    let fh = now(fs.open(log, false, &ROOT)).unwrap();
    assert_eq!(now(fs.read(fh, 0, 100)).unwrap(), b"");
    fs.tree().log.lock().unwrap().extend_from_slice(b"line 1\n");
    assert_eq!(fs.getattr(log, Some(fh), &ROOT).unwrap().0.size, 7);
    assert_eq!(now(fs.read(fh, 0, 100)).unwrap(), b"line 1\n");
    fs.tree().log.lock().unwrap().extend_from_slice(b"line 2\n");
    assert_eq!(now(fs.read(fh, 7, 100)).unwrap(), b"line 2\n");
}

#[test]
fn a_log_whose_bytes_come_later_is_read_without_holding_the_caller() {
    let fs = fs();
    let log = ino(&fs, ROOT_INO, "slowlog");
    let fh = now(fs.open(log, false, &ROOT)).unwrap();
    fs.tree().log.lock().unwrap().extend_from_slice(b"line 1\n");
    let Answer::Later(fut) = fs.read_handle(fh, 0, 100) else { panic!("a slow log was read now") };
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    assert_eq!(rt.block_on(fut).unwrap(), b"line 1\n");
}

#[test]
fn control_reads_usage_until_written_then_the_answers() {
    let fs = fs();
    let ctl = ino(&fs, ROOT_INO, "ctl");
    let fh = now(fs.open(ctl, false, &ROOT)).unwrap();
    assert_eq!(now(fs.read(fh, 0, 100)).unwrap(), b"usage: ping\n");
    assert_eq!(now(fs.write(fh, 0, b"ping\n", &ROOT)).unwrap(), 5);
    // The kernel offset is past the written bytes; the answer is still read from its start.
    assert_eq!(now(fs.read(fh, 5, 100)).unwrap(), format!("pong {fh}\n").as_bytes());
    assert_eq!(now(fs.read(fh, 100, 100)).unwrap(), b"");
}

#[test]
fn failures_land_in_the_callers_error_file_only() {
    let fs = fs();
    let d = ino(&fs, ROOT_INO, "d");
    let ctl = ino(&fs, d, "ctl");
    let fh = now(fs.open(ctl, false, &ALICE)).unwrap();
    let err = now(fs.write(fh, 0, b"nope", &ALICE)).unwrap_err();
    assert_eq!(err.errno, Errno::Inval);
    let error = ino(&fs, d, "error");
    let read = |who: &Caller| {
        let fh = now(fs.open(error, false, who)).unwrap();
        String::from_utf8(now(fs.read(fh, 0, 4096)).unwrap()).unwrap()
    };
    assert_eq!(read(&ALICE), "EINVAL: d/ctl takes: ping\n");
    assert_eq!(read(&ROOT), "", "root did not fail here");
    assert_eq!(fs.lookup(d, "error", &ALICE).unwrap().attr.size, 26, "true size for the caller");
}

#[test]
fn blocking_reads_wait_in_a_task_or_say_eagain() {
    let fs = fs();
    let wait = ino(&fs, ROOT_INO, "wait");
    let err = now(fs.open(wait, true, &ROOT)).unwrap_err();
    assert_eq!(err.errno, Errno::Again, "O_NONBLOCK returns at once");
    assert!(matches!(fs.open(wait, false, &ROOT), Answer::Later(_)), "a blocking open is answered later");
    *fs.tree().ready.lock().unwrap() = Some("done 3\n".into());
    let fh = now(fs.open(wait, true, &ROOT)).unwrap();
    assert_eq!(now(fs.read(fh, 0, 100)).unwrap(), b"done 3\n");
}

#[test]
fn a_read_after_a_wait_ends_shows_what_the_wait_saw() {
    let fs = fs();
    let snap = ino(&fs, ROOT_INO, "snap");
    let wait = ino(&fs, ROOT_INO, "wait");
    let fh = now(fs.open(snap, false, &ROOT)).unwrap();
    assert_eq!(now(fs.read(fh, 0, 100)).unwrap(), b"render 0\n");
    // `cat wait; cat state` within one file TTL: the state must not predate the wait's answer.
    *fs.tree().ready.lock().unwrap() = Some("done 0\n".into());
    now(fs.open(wait, false, &ROOT)).unwrap();
    let fh = now(fs.open(snap, false, &ROOT)).unwrap();
    assert_eq!(now(fs.read(fh, 0, 100)).unwrap(), b"render 1\n");
}

#[test]
fn readdir_cookies_are_inodes_in_order() {
    let fs = fs();
    let all = fs.readdir(ROOT_INO, 0).unwrap();
    assert_eq!(all.iter().map(|e| e.name.as_str()).take(2).collect::<Vec<_>>(), [".", ".."]);
    assert_eq!(all.len(), 7);
    for w in all[2..].windows(2) {
        assert!(w[0].cookie < w[1].cookie);
    }
    for k in 0..all.len() {
        let rest = fs.readdir(ROOT_INO, all[k].cookie).unwrap();
        assert_eq!(rest, all[k + 1..].to_vec());
    }
}

#[test]
fn a_listing_is_one_walk_of_the_tree_however_many_reads_it_takes() {
    let fs = fs();
    let lists = || fs.tree().lists.load(std::sync::atomic::Ordering::SeqCst);
    let all = fs.readdir(ROOT_INO, 0).unwrap();
    let walked = lists();
    // Reads going on from a cookie use that listing (a 100,000-entry directory is read in
    // thousands of them).
    for e in &all[2..] {
        fs.readdir(ROOT_INO, e.cookie).unwrap();
    }
    assert_eq!(lists(), walked);
    // A read from the start lists anew.
    assert_eq!(fs.readdir(ROOT_INO, 0).unwrap(), all);
    assert!(lists() > walked);
}

#[test]
fn inodes_from_a_previous_process_resolve_by_walking() {
    let a = fs();
    let d = ino(&a, ROOT_INO, "d");
    let ctl = ino(&a, d, "ctl");
    // A new process (after a restart) has never handed out these numbers.
    let b = fs();
    assert_eq!(b.getattr(ctl, None, &ROOT).unwrap().0.ino.0, ctl);
    assert_eq!(b.lookup(ctl, ".", &ROOT).unwrap().attr.ino.0, ctl);
    assert_eq!(b.lookup(ctl, "..", &ROOT).unwrap().attr.ino.0, d);
    assert_eq!(b.getattr(0x1234_5678, None, &ROOT).unwrap_err().errno, Errno::Stale);
}

#[test]
fn truncate_only_control_files_to_zero() {
    let fs = fs();
    let ctl = ino(&fs, ROOT_INO, "ctl");
    let snap = ino(&fs, ROOT_INO, "snap");
    let none = Chattr::default();
    assert!(fs.setattr(ctl, Some(0), none, &ROOT).is_ok());
    assert_eq!(fs.setattr(ctl, Some(3), none, &ROOT).unwrap_err().errno, Errno::Perm);
    assert_eq!(fs.setattr(snap, Some(0), none, &ROOT).unwrap_err().errno, Errno::Perm);
    let chmod = |mode| Chattr { mode: Some(mode), ..Chattr::default() };
    assert_eq!(fs.setattr(ctl, None, chmod(0o777), &ROOT).unwrap_err().errno, Errno::Perm, "the tree refuses");
    let perm = u32::from(fs.getattr(ctl, None, &ROOT).unwrap().0.perm);
    assert!(fs.setattr(ctl, None, chmod(perm), &ROOT).is_ok(), "a chmod that changes nothing");
    let chown = Chattr { uid: Some(1000), ..Chattr::default() };
    assert_eq!(fs.setattr(ctl, None, chown, &ROOT).unwrap_err().errno, Errno::Perm);
    // CREATE of an existing control file opens it.
    assert_eq!(now(fs.create(ROOT_INO, "ctl", 0o644, &ROOT)).unwrap().attr.ino.0, ctl);
    assert_eq!(now(fs.create(ROOT_INO, "snap", 0o644, &ROOT)).unwrap_err().errno, Errno::Exist);
}
