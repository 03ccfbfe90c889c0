//! The layer on a real kernel mount: `tail -f` follows a log, O_NONBLOCK skips a blocking file.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clusterfs_fs::{Config, SynthFs};
use common::Toy;

fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    let ok = unsafe { libc::geteuid() } == 0 && std::path::Path::new("/dev/fuse").exists();
    assert!(ok || std::env::var("CI").as_deref() != Ok("true"), "CI=true but cannot mount");
    ok
}

struct Mounted {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    fs: Arc<SynthFs<Toy>>,
    mount: Option<clusterfs_fs::Mount>,
    _rt: tokio::runtime::Runtime,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            let _ = m.unmount();
        }
    }
}

fn mounted() -> Mounted {
    mounted_with(Config::default().threads)
}

fn mounted_with(threads: usize) -> Mounted {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    std::fs::create_dir(&path).unwrap();
    let fs = SynthFs::new(Arc::new(Toy::default()), Config { fsname: "toy".into(), threads, ..Config::default() });
    let mount = clusterfs_fs::mount(fs.clone(), &path, rt.handle().clone()).unwrap();
    Mounted { _dir: dir, path, fs, mount: Some(mount), _rt: rt }
}

#[test]
fn tail_follows_an_append_only_log() {
    if !can_mount() {
        return;
    }
    let m = mounted();
    m.fs.tree().log.lock().unwrap().extend_from_slice(b"first\n");
    let mut tail = Command::new("tail")
        .args(["-n", "+1", "-s", "0.1", "-f"])
        .arg(m.path.join("log"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(tail.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "first\n");
    for i in 0..3 {
        m.fs.tree().log.lock().unwrap().extend_from_slice(format!("more {i}\n").as_bytes());
        line.clear();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, format!("more {i}\n"));
    }
    let _ = tail.kill();
    let _ = tail.wait();
    // stat reports the live length.
    assert_eq!(std::fs::metadata(m.path.join("log")).unwrap().len(), 6 + 3 * 7);
}

#[test]
fn blocking_file_waits_without_holding_fuse_threads_and_nonblock_skips() {
    if !can_mount() {
        return;
    }
    let m = mounted();
    let p = m.path.join("wait");
    let err = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&p).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EAGAIN));
    // More waiters than FUSE threads (4), and the mount still answers at once.
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || std::fs::read_to_string(p).unwrap())
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    let mut s = String::new();
    std::fs::File::open(m.path.join("snap")).unwrap().read_to_string(&mut s).unwrap();
    assert!(start.elapsed() < Duration::from_millis(200), "{:?}", start.elapsed());
    for w in waiters {
        assert_eq!(w.join().unwrap(), "done 0\n");
    }
}

#[test]
fn echo_into_a_control_file_and_read_back_on_the_same_handle() {
    if !can_mount() {
        return;
    }
    let m = mounted();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("exec 3<>{}; echo ping >&3; read answer <&3; echo \"$answer\"", m.path.join("ctl").display()))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("pong "), "{out:?}");
    let out =
        Command::new("bash").arg("-c").arg(format!("echo nope > {}", m.path.join("d/ctl").display())).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Invalid argument"), "{out:?}");
    assert_eq!(std::fs::read_to_string(m.path.join("d/error")).unwrap(), "EINVAL: d/ctl takes: ping\n");
}

#[test]
fn a_panicking_tree_answers_eio_and_the_mount_lives() {
    if !can_mount() {
        return;
    }
    let m = mounted();
    for _ in 0..8 {
        // More panics than FUSE threads: none of them may take a thread down.
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("echo panic > {}", m.path.join("ctl").display()))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stderr).contains("Input/output error"), "{out:?}");
    }
    let mut s = String::new();
    std::fs::File::open(m.path.join("snap")).unwrap().read_to_string(&mut s).unwrap();
    assert!(s.starts_with("render "), "{s}");
    // release spawned a task (it needs the runtime) and it ran.
    let t = Instant::now();
    while m.fs.tree().released.lock().unwrap().is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!m.fs.tree().released.lock().unwrap().is_empty());
}

#[test]
fn a_remote_trees_slow_lookup_holds_no_fuse_thread() {
    if !can_mount() {
        return;
    }
    // One FUSE thread: whatever it waits for, every other request waits for too.
    let m = mounted_with(1);
    m.fs.tree().remote.store(true, std::sync::atomic::Ordering::SeqCst);
    let slow = m.path.join("slow");
    let looked_up = std::thread::spawn(move || std::fs::metadata(slow).is_ok());
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(std::fs::read_to_string(m.path.join("ctl")).unwrap(), "usage: ping\n");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(800), "a read waited {took:?} behind a slow lookup");
    assert!(looked_up.join().unwrap());
}
