//! Starts real heads and agents on a temporary mountpoint; everything is stopped and unmounted on drop.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long one test's cluster may live before the watchdog ends it (CLUSTERFS_TEST_DEADLINE_S).
const DEADLINE: Duration = Duration::from_secs(240);

/// Polls `f` until it holds or `timeout` (times the slack) passes; returns whether it held.
/// Waits are not speed targets (those are benchmarks): on a shared CI machine, several times
/// slower than a developer's, each waits three times as long (CLUSTERFS_TEST_SLACK).
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let timeout = timeout * slack();
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// How many times longer than written a wait may take: CLUSTERFS_TEST_SLACK, else 3 under
/// CI=true and 1 elsewhere.
pub fn slack() -> u32 {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    std::env::var("CLUSTERFS_TEST_SLACK").ok().and_then(|s| s.parse().ok()).unwrap_or(if ci { 3 } else { 1 })
}

/// A file that a job's script waits for, so that a test sees the job at a chosen point of
/// its run however slow the machine is (a `sleep` gives it a window a loaded machine misses).
pub struct Gate(PathBuf);

impl Gate {
    /// A closed gate named `name` in `dir` (a directory every test user can search).
    pub fn new(dir: &Path, name: &str) -> Gate {
        Gate(dir.join(name))
    }

    /// Shell words that wait until the gate is open.
    pub fn wait(&self) -> String {
        format!("while [ ! -e {} ]; do sleep 0.05; done", self.0.display())
    }

    /// Lets every script waiting on the gate go on.
    pub fn open(&self) {
        fs::write(&self.0, "").expect("open the gate");
    }
}

pub fn bin(name: &str) -> PathBuf {
    let head = PathBuf::from(env!("CARGO_BIN_EXE_clusterfs"));
    let p = head.with_file_name(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace` first", p.display());
    p
}

/// A running cluster: `clusterfs up` with local agents, on its own mountpoint and state.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    pub state: PathBuf,
    pub nodes: String,
    /// Where the head listens: a free port at first, then the same one on every restart.
    listen: String,
    head: Option<Child>,
    /// The command prefix the head runs under (e.g. `nsenter --net=...` to put it on a test host).
    head_prefix: Vec<String>,
    agents: Vec<Child>,
    _watchdog: Watchdog,
}

/// Ends a test cluster that outlives its deadline: its head and agents are SIGKILLed, so a read
/// blocked on the mount fails (ENOTCONN) and the test fails with it instead of hanging CI.
struct Watchdog {
    cancel: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(dir: &Path) -> Watchdog {
        let deadline = std::env::var("CLUSTERFS_TEST_DEADLINE_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(DEADLINE, Duration::from_secs);
        let (cancel, cancelled) = mpsc::channel::<()>();
        let dir = dir.to_path_buf();
        let thread = std::thread::spawn(move || {
            if cancelled.recv_timeout(deadline) != Err(mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            eprintln!(
                "watchdog: the test cluster in {} outlived {deadline:?}: killing it. Head log, last lines:\n{}",
                dir.display(),
                log_tail(&dir, 60)
            );
            kill_cluster(&dir);
        });
        Watchdog { cancel: Some(cancel), thread: Some(thread) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.cancel.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Cluster {
    /// `clusterfs up` serving `nodes`, reports every `interval_ms`; returns once all are up.
    pub fn up(nodes: &str, interval_ms: u64) -> Cluster {
        Cluster::up_with(nodes, interval_ms, "")
    }

    /// Like `up`, with `extra` appended to the head's config file (e.g. a `[jobs]` table).
    pub fn up_with(nodes: &str, interval_ms: u64, extra: &str) -> Cluster {
        Cluster::up_on(nodes, interval_ms, extra, "127.0.0.1:0")
    }

    /// Like `up_with`, with the head taking agents on `listen` (e.g. `0.0.0.0:0` for guests).
    pub fn up_on(nodes: &str, interval_ms: u64, extra: &str, listen: &str) -> Cluster {
        Cluster::up_under(Vec::new(), nodes, interval_ms, extra, listen)
    }

    /// A head alone (`clusterfs mount`, no local agent) on host `host` of `net`, listening on
    /// its address there; agents come with `agent_on`.
    pub fn up_in(net: &crate::net::Net, host: usize, interval_ms: u64, extra: &str) -> Cluster {
        Cluster::up_under(net.on(host), "", interval_ms, extra, &format!("{}:0", net.ip(host)))
    }

    fn up_under(head_prefix: Vec<String>, nodes: &str, interval_ms: u64, extra: &str, listen: &str) -> Cluster {
        let dir = tempfile::Builder::new().prefix("clusterfs-test").tempdir().expect("tempdir");
        // Unprivileged test users must be able to reach the mountpoint.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let mnt = dir.path().join("mnt");
        let state = dir.path().join("state");
        // Down after 8 missed reports: with the short intervals tests use, 3 made a node of a
        // loaded CI machine look down for a stall of 600 ms, and a multi-node job fail on it.
        fs::write(
            dir.path().join("config.toml"),
            format!("[head]\ninterval_ms = {interval_ms}\nmissed_intervals = 8\nping_timeout_ms = 1000\n{extra}"),
        )
        .expect("config");
        let watchdog = Watchdog::start(dir.path());
        let mut c = Cluster {
            dir,
            mnt,
            state,
            nodes: nodes.to_string(),
            listen: listen.into(),
            head: None,
            head_prefix,
            agents: Vec::new(),
            _watchdog: watchdog,
        };
        c.start_head();
        c
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("head.log")
    }

    /// Starts (or restarts) the head on the same state and mountpoint.
    pub fn start_head(&mut self) {
        let log = fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log");
        let mut cmd = prefixed(&self.head_prefix, &bin("clusterfs"));
        if self.nodes.is_empty() {
            cmd.arg("mount").arg(&self.mnt);
        } else {
            cmd.arg("up").arg(&self.mnt).args(["--nodes", &self.nodes]);
        }
        let child = cmd
            .args(["--listen", &self.listen, "--state"])
            .arg(&self.state)
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .env("CLUSTERFS_LOG", std::env::var("CLUSTERFS_TEST_LOG").unwrap_or("info".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start clusterfs up");
        self.head = Some(child);
        // Every local node is up (agents started by a test may come back too).
        let want = clusterfs::nodeset::NodeSet::parse(&self.nodes).expect("test nodeset");
        let all_up = |up: &str| {
            clusterfs::nodeset::NodeSet::parse(up.trim()).is_ok_and(|up| want.iter().all(|n| up.contains(&n)))
        };
        let ok = eventually(Duration::from_secs(20), || {
            self.try_read("nodes/up").is_some_and(|s| all_up(&s)) && self.state.join("head.addr").exists()
        });
        assert!(ok, "nodes/up never held {}; head log:\n{}", want.fold(), self.log());
        self.listen = self.addr();
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn try_read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.path(rel)).ok()
    }

    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    /// Writes `data` as `echo` or `cat` would (one write(2), continued while it is short);
    /// returns the errno of the first failure.
    pub fn write(&self, rel: &str, data: &[u8]) -> Result<(), i32> {
        use std::io::Write;
        let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(0);
        let mut f =
            fs::OpenOptions::new().write(true).create(true).truncate(true).open(self.path(rel)).map_err(errno)?;
        f.write_all(data).map_err(errno)
    }

    pub fn addr(&self) -> String {
        fs::read_to_string(self.state.join("head.addr")).expect("head.addr").trim().to_string()
    }

    pub fn secret_file(&self) -> PathBuf {
        self.state.join("secret")
    }

    /// Starts an extra agent process for `name`; it is stopped when the cluster drops.
    pub fn agent(&mut self, name: &str) -> usize {
        self.agent_with(&["--name", name])
    }

    /// Starts an extra agent process with these arguments (its name and role); it is stopped
    /// when the cluster drops.
    pub fn agent_with(&mut self, args: &[&str]) -> usize {
        self.agent_on(&[], &self.addr(), args)
    }

    /// Starts an agent under a command `prefix` (e.g. on a test host of a `Net`) that dials
    /// `head`; it is stopped when the cluster drops.
    pub fn agent_on(&mut self, prefix: &[String], head: &str, args: &[&str]) -> usize {
        let child = prefixed(prefix, &bin("clusterfs-agent"))
            .args(args)
            .args(["--head", head, "--secret-file"])
            .arg(self.secret_file())
            .arg("--state")
            .arg(self.dir.path().join("agents"))
            .env("CLUSTERFS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start clusterfs-agent");
        self.agents.push(child);
        self.agents.len() - 1
    }

    pub fn agent_pid(&self, i: usize) -> i32 {
        pid(&self.agents[i])
    }

    pub fn kill_agent(&mut self, i: usize) {
        let _ = self.agents[i].kill();
        let _ = self.agents[i].wait();
    }

    pub fn head_pid(&self) -> i32 {
        pid(self.head.as_ref().expect("head running"))
    }

    /// SIGKILLs the head: the mount is left stale, as after a crash. Its local agent lives on
    /// until it is killed too (it is a separate process).
    pub fn crash_head(&mut self) {
        if let Some(mut h) = self.head.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
    }

    /// The head's exit status, once it has ended by itself.
    pub fn head_exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.head.as_mut()?.try_wait().ok()??;
        self.head = None;
        Some(status)
    }

    /// Stops the head with SIGTERM and waits for a clean unmount; its exit status, or None
    /// when it had to be killed after 10 s.
    pub fn stop_head(&mut self) -> Option<std::process::ExitStatus> {
        let mut h = self.head.take()?;
        signal(pid(&h), libc::SIGTERM);
        let mut status = None;
        eventually(Duration::from_secs(10), || {
            status = h.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_none() {
            let _ = h.kill();
            let _ = h.wait();
        }
        status
    }

    pub fn is_mounted(&self) -> bool {
        is_mounted(&self.mnt)
    }
}

pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and a valid signal number has no memory effects.
    unsafe {
        libc::kill(pid, sig);
    }
}

pub fn is_mounted(p: &Path) -> bool {
    let p = p.to_string_lossy().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_str()))
}

fn detach(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path has no NUL");
    // SAFETY: umount2 reads a valid NUL-terminated path; MNT_DETACH needs nothing else.
    unsafe {
        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failed test shows what its head said last.
        if std::thread::panicking() {
            eprintln!("head log, last lines:\n{}", log_tail(self.dir.path(), 80));
        }
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        self.stop_head();
        // Agents whose head was killed end with it (PDEATHSIG); runs outlive agents by design.
        // A test leaves neither behind.
        kill_cluster(self.dir.path());
        // Leave no mount behind, even after a crash or a failed unmount.
        for _ in 0..50 {
            if !is_mounted(&self.mnt) {
                break;
            }
            detach(&self.mnt);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The last `n` lines of the head log of the cluster in `dir`.
fn log_tail(dir: &Path, n: usize) -> String {
    let log = fs::read_to_string(dir.join("head.log")).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(n).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// SIGKILLs every process of the cluster in `dir`: its jobs (the members of its run
/// supervisors' cgroups), then every process naming `dir` on its command line (head, agents,
/// supervisors).
fn kill_cluster(dir: &Path) {
    let out = Command::new("pgrep").args(["-f", "--"]).arg(format!("--shim {}/", dir.display())).output();
    let shims: Vec<String> =
        out.map(|o| String::from_utf8_lossy(&o.stdout).lines().map(String::from).collect()).unwrap_or_default();
    for ctl in ["memory/clusterfs", "cpu/clusterfs", "clusterfs"] {
        let Ok(groups) = fs::read_dir(Path::new("/sys/fs/cgroup").join(ctl)) else { continue };
        for g in groups.flatten() {
            let name = g.file_name().to_string_lossy().to_string();
            if !shims.iter().any(|pid| name.ends_with(&format!("-{pid}"))) {
                continue;
            }
            for pid in fs::read_to_string(g.path().join("cgroup.procs")).unwrap_or_default().lines() {
                if let Ok(pid) = pid.parse::<i32>() {
                    signal(pid, libc::SIGKILL);
                }
            }
        }
    }
    let _ = Command::new("pkill").args(["-9", "-f", "--"]).arg(dir.as_os_str()).status();
}

/// Runs `bash -c script` as `user` (runuser); returns (exit code, stdout, stderr).
pub fn sh_as(user: &str, script: &str) -> (i32, String, String) {
    let out = Command::new("runuser").args(["-u", user, "--", "bash", "-c", script]).output().expect("runuser");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Runs `bash -c script` as root; returns (exit code, stdout, stderr).
pub fn sh(script: &str) -> (i32, String, String) {
    let out = Command::new("bash").args(["-c", script]).output().expect("bash");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `program` run under `prefix` (a wrapper like `nsenter ... --`), or alone when it is empty.
fn prefixed(prefix: &[String], program: &Path) -> Command {
    match prefix.split_first() {
        None => Command::new(program),
        Some((wrapper, args)) => {
            let mut c = Command::new(wrapper);
            c.args(args).arg(program);
            c
        }
    }
}

/// A child's pid as kill(2) takes it (pids fit in i32 on Linux).
fn pid(child: &Child) -> i32 {
    i32::try_from(child.id()).expect("pids fit in i32")
}
