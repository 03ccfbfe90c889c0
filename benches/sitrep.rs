//! Benchmarks of the foundation, each side by side with its floor in the same run:
//! sitrep read latency vs a minimal fuser filesystem, 1,000 sitreps, agent CPU and memory.
//!
//! Run with `scripts/bench` (root, /dev/fuse); prints a Markdown report.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags, ReplyAttr,
    ReplyData, ReplyEntry, ReplyOpen, Request,
};

/// The FUSE floor: one static file, nothing else, served by fuser directly.
struct Floor {
    data: Vec<u8>,
}

const TTL: Duration = Duration::from_millis(100);

impl Floor {
    fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == 1;
        FileAttr {
            ino: INodeNo(ino),
            size: if dir { 0 } else { self.data.len() as u64 },
            blocks: 1,
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind: if dir { FileType::Directory } else { FileType::RegularFile },
            perm: if dir { 0o755 } else { 0o444 },
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for Floor {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == "sitrep" {
            reply.entry(&TTL, &self.attr(2), Generation(0));
        } else {
            reply.error(fuser::Errno::ENOENT);
        }
    }
    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&TTL, &self.attr(ino.0));
    }
    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Same open flags as clusterfs, so the comparison is of the filesystems alone.
        reply.opened(FileHandle(1), FopenFlags::FOPEN_DIRECT_IO);
    }
    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let start = (offset as usize).min(self.data.len());
        let end = (start + size as usize).min(self.data.len());
        reply.data(&self.data[start..end]);
    }
}

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // benches run from target/<profile>/deps; the binaries sit one level up.
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(p.exists(), "{} missing: build with --release first", p.display());
    p
}

/// Times `n` open + read-to-end + close of `path` (what `cat` does, without the fork).
fn latencies(path: &Path, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    let mut buf = Vec::with_capacity(4096);
    for _ in 0..n {
        buf.clear();
        let t = Instant::now();
        std::fs::File::open(path).expect("open").read_to_end(&mut buf).expect("read");
        out.push(t.elapsed());
    }
    out.sort();
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Head {
    child: Child,
    mnt: PathBuf,
    state: PathBuf,
}

impl Drop for Head {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(i32::try_from(self.child.id()).expect("pids fit in i32"), libc::SIGTERM) };
        let _ = self.child.wait();
        let c = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_head(dir: &Path, sub: &str, nodes: Option<&str>) -> Head {
    let mnt = dir.join(format!("{sub}-mnt"));
    let state = dir.join(format!("{sub}-state"));
    let mut cmd = Command::new(bin("clusterfs"));
    match nodes {
        Some(n) => cmd.arg("up").arg(&mnt).args(["--nodes", n]),
        None => cmd.arg("mount").arg(&mnt),
    };
    let child = cmd
        .args(["--listen", "127.0.0.1:0", "--state"])
        .arg(&state)
        .env("CLUSTERFS_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("clusterfs");
    let head = Head { child, mnt, state };
    wait_for("the mount", Duration::from_secs(20), || head.mnt.join("nodes/all").exists());
    head
}

/// (CPU seconds, RSS KiB) of a process.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    (ticks / hz, rss)
}

fn agent_cost(head: &Head, nodes: &str, seconds: u64) -> (f64, u64) {
    let mut agent = Command::new(bin("clusterfs-agent"))
        .args(["--head", std::fs::read_to_string(head.state.join("head.addr")).unwrap().trim(), "--nodes", nodes])
        .arg("--secret-file")
        .arg(head.state.join("secret"))
        .arg("--state")
        .arg(head.state.join("bench-agents"))
        .env("CLUSTERFS_LOG", "warn")
        .spawn()
        .expect("agent");
    let count = clusterfs::nodeset::NodeSet::parse(nodes).unwrap().len();
    let up = head.mnt.join("nodes/up");
    wait_for("agents up", Duration::from_secs(60), || {
        std::fs::read_to_string(&up)
            .ok()
            .and_then(|s| clusterfs::nodeset::NodeSet::parse(s.trim()).ok())
            .is_some_and(|s| s.len() >= count)
    });
    std::thread::sleep(Duration::from_secs(2));
    let (cpu0, _) = usage(agent.id());
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let (cpu1, rss) = usage(agent.id());
    let pct = 100.0 * (cpu1 - cpu0) / t0.elapsed().as_secs_f64();
    let _ = agent.kill();
    let _ = agent.wait();
    (pct, rss)
}

fn main() {
    let n: usize = std::env::var("BENCH_READS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let secs: u64 = std::env::var("BENCH_AGENT_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().expect("tempdir");
    println!("## Foundation: sitrep reads and the agent\n");
    println!("Machine: {} cores, {}; `scripts/bench`, {} reads per side.\n", num_cpus(), kernel(), n);

    // 1. One sitrep vs the FUSE floor, same size, same run.
    let head = start_head(dir.path(), "one", Some("cn0"));
    let sitrep = head.mnt.join("nodes/cn0/sitrep");
    wait_for("cn0 up", Duration::from_secs(20), || {
        std::fs::read_to_string(head.mnt.join("nodes/up")).is_ok_and(|s| s == "cn0\n")
    });
    let size = std::fs::read(&sitrep).unwrap().len();
    let floor_dir = dir.path().join("floor");
    std::fs::create_dir(&floor_dir).unwrap();
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![fuser::MountOption::FSName("floor".into())];
    cfg.n_threads = Some(4);
    let floor = fuser::spawn_mount(Floor { data: vec![b'x'; size] }, &floor_dir, &cfg).expect("mount the floor");
    let floor_file = floor_dir.join("sitrep");
    let _ = latencies(&floor_file, 200);
    let _ = latencies(&sitrep, 200);
    // Interleave rounds so machine noise hits both sides alike.
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        a.extend(latencies(&floor_file, n / 5));
        b.extend(latencies(&sitrep, n / 5));
    }
    a.sort();
    b.sort();
    println!("| read of one {size}-byte file | p50 µs | p99 µs |\n|---|---|---|");
    println!("| minimal fuser filesystem (the floor) | {:.1} | {:.1} |", us(pct(&a, 0.5)), us(pct(&a, 0.99)));
    println!("| clusterfs `nodes/cn0/sitrep` | {:.1} | {:.1} |", us(pct(&b, 0.5)), us(pct(&b, 0.99)));
    println!(
        "| **ratio** clusterfs / floor | **{:.2}x** | **{:.2}x** |\n",
        us(pct(&b, 0.5)) / us(pct(&a, 0.5)),
        us(pct(&b, 0.99)) / us(pct(&a, 0.99))
    );
    drop(floor);
    let (cpu, rss) = agent_cost(&head, "solo1", secs);
    drop(head);

    // 2. 1,000 node names from one agent process; read every sitrep.
    let head = start_head(dir.path(), "many", None);
    let (cpu_many, rss_many) = {
        let h = &head;
        std::thread::scope(|s| {
            let t = s.spawn(|| agent_cost(h, "sim[0-999]", secs));
            // While the agent runs: time `cat nodes/*/sitrep` over all 1,000 once they are up.
            wait_for("1000 nodes", Duration::from_secs(60), || {
                std::fs::read_to_string(h.mnt.join("nodes/up")).is_ok_and(|s| s.trim() == "sim[0-999]")
            });
            let mut times = Vec::new();
            for _ in 0..5 {
                let t0 = Instant::now();
                let st = Command::new("bash")
                    .arg("-c")
                    .arg(format!("cat {}/nodes/*/sitrep | wc -l", h.mnt.display()))
                    .output()
                    .unwrap();
                times.push(t0.elapsed());
                let lines: usize = String::from_utf8_lossy(&st.stdout).trim().parse().unwrap_or(0);
                assert_eq!(lines, 1000 * clusterfs::sitrep::KEYS.len(), "every sitrep read whole");
            }
            times.sort();
            println!("| `cat nodes/*/sitrep`, 1,000 nodes (bash glob + cat, 5 runs) | time |\n|---|---|");
            println!("| best | {:.3} s |", times[0].as_secs_f64());
            println!("| median | {:.3} s |\n", times[2].as_secs_f64());
            t.join().unwrap()
        })
    };
    println!("| agent at a 1 s interval ({secs} s sampled) | CPU % of one core | RSS |\n|---|---|---|");
    println!("| 1 node name | {cpu:.3} % | {:.1} MiB |", rss as f64 / 1024.0);
    println!("| 1,000 node names in one process | {cpu_many:.3} % | {:.1} MiB |", rss_many as f64 / 1024.0);
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "linux".into(), |s| format!("Linux {}", s.trim()))
}
