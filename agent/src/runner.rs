//! Runs on this node, kept as files: each run has a directory the shim writes and the link reads.
//!
//! `<runs>/<run>/` holds `run.json` (what the head asked), `stdout`, `stderr`, `shim.pid` (the
//! shim's pid and start time, then the job's pid: written by the shim), `signal` (a kill that
//! came before the pid) and `exit.json` (written by the shim when the run ends). A run whose
//! directory exists has been started: a resent request never starts it again. The files, not
//! the agent's memory, are the truth, so runs outlive an agent restart.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clusterfs::jobs::{Exit, Run, RunStatus};
use nix::sys::signal::Signal;
use tracing::{info, warn};

/// The runs of one node name.
#[derive(Debug)]
pub struct Runner {
    dir: PathBuf,
    /// Woken when a supervisor this process started ends, so its exit is sent at once.
    pub ended: Arc<tokio::sync::Notify>,
}

/// What a start request did.
#[derive(Debug, PartialEq, Eq)]
pub enum Started {
    Now,
    Before,
}

impl Runner {
    pub fn new(dir: PathBuf) -> std::io::Result<Runner> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        clusterfs::jobs::spread_subdirectories(&dir);
        let ended: Arc<tokio::sync::Notify> = Arc::default();
        if let Some(z) = crate::zygote::get() {
            z.watch(&dir, ended.clone());
        }
        Ok(Runner { dir, ended })
    }

    pub fn run_dir(&self, run: u64) -> PathBuf {
        self.dir.join(run.to_string())
    }

    /// Starts `run` through the shim unless it was started before.
    pub fn start(&self, run: &Run) -> Result<Started, String> {
        let dir = self.run_dir(run.run);
        // Creating the directory is the once-only step: it fails if the run is known.
        match fs::DirBuilder::new().mode(0o711).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(Started::Before),
            Err(e) => return Err(format!("cannot make {}: {e}", dir.display())),
        }
        let setup = || -> std::io::Result<()> {
            // Only the request is synced: the rest is remade from it or written by the run.
            // The shim hands the job its script from it.
            write_new(&dir.join("run.json"), &serde_json::to_vec(run).expect("runs serialize"), 0o600, true)?;
            for f in ["stdout", "stderr"] {
                write_new(&dir.join(f), b"", 0o600, false)?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            let _ = fs::remove_dir_all(&dir);
            return Err(format!("cannot prepare run {}: {e}", run.run));
        }
        if run.copy.is_some() {
            // A copy is received by this process: it stands as the run's supervisor, so a
            // copy cut short by an agent restart ends as one whose supervisor died.
            record_shim(&dir, std::process::id()).map_err(|e| format!("cannot record run {}: {e}", run.run))?;
            info!(run = run.run, user = run.user, dest = run.copy.as_deref().unwrap_or(""), "copy run expected");
            return Ok(Started::Now);
        }
        // The shim records its pid first thing: until then a run is known as starting.
        if let Some(z) = crate::zygote::get() {
            match z.spawn(&dir) {
                Ok(()) => {
                    info!(run = run.run, user = run.user, "run started");
                    return Ok(Started::Now);
                }
                Err(e) => warn!(run = run.run, error = %e, "the zygote is gone: starting the run by exec"),
            }
        }
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("--shim").arg(&dir);
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        // The shim leads its own session: it outlives the agent and is never signalled with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        match cmd.spawn() {
            Ok(mut child) => {
                // The shim records itself too, first thing: whichever write lands, it is the same.
                if let Err(e) = record_shim(&dir, child.id()) {
                    warn!(run = run.run, error = %e, "cannot record the run's supervisor");
                }
                // Reap the shim when it ends so it leaves no zombie, and say so.
                let ended = self.ended.clone();
                std::thread::spawn(move || {
                    let _ = child.wait();
                    ended.notify_one();
                });
                info!(run = run.run, user = run.user, "run started");
                Ok(Started::Now)
            }
            Err(e) => {
                // A run that could not start still ends, with the reason.
                let exit = Exit { code: 127, signal: None, reason: Some(format!("failed to start: {e}")) };
                write_exit(&dir, &exit).map_err(|e| e.to_string())?;
                Ok(Started::Now)
            }
        }
    }

    /// Sends `signal` to the run's process group, or leaves it for the shim when the process
    /// is not there yet; false when the run is unknown (its start request may be on its way).
    pub fn signal(&self, run: u64, signal: i32) -> Result<bool, String> {
        let dir = self.run_dir(run);
        if !dir.exists() {
            return Ok(false);
        }
        if dir.join("exit.json").exists() {
            return Ok(true);
        }
        let sig = Signal::try_from(signal).map_err(|_| format!("no signal {signal}"))?;
        let pid = match read_pid(&dir) {
            Some(pid) => pid,
            None => {
                // The shim has the run but not its process yet: the signal waits in a file the
                // shim reads once the process is there. Checked again after writing it, as the
                // shim writes its pid before reading the file: one of the two sees the other.
                // A SIGKILL following a waiting SIGTERM is the head's escalation: the shim
                // escalates itself once the job has had its SIGTERM.
                if sig == Signal::SIGKILL && pending_signal(&dir) == Some(Signal::SIGTERM) {
                    return Ok(true);
                }
                fs::write(dir.join(PENDING_SIGNAL), format!("{signal}\n"))
                    .map_err(|e| format!("cannot keep signal {sig} for run {run}: {e}"))?;
                match read_pid(&dir) {
                    Some(pid) => pid,
                    None => return Ok(true),
                }
            }
        };
        // The job's pid is only its own while the shim has not reaped it: a pid whose parent is
        // no longer this run's shim belongs to someone else now.
        let shim = read_shim(&dir).and_then(|(shim, _)| i32::try_from(shim).ok());
        let parent: Option<i32> = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok());
        if shim.is_none() || parent != shim {
            return Ok(true);
        }
        match nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(true),
            Err(e) => Err(format!("signal {sig} to run {run}: {e}")),
        }
    }

    /// Drops a run's files once the head has all of it.
    pub fn forget(&self, run: u64) {
        let dir = self.run_dir(run);
        if dir.exists() && !dir.join("exit.json").exists() {
            warn!(run, "asked to forget a run still going: signalling it first");
            let _ = self.signal(run, libc::SIGKILL);
        }
        let _ = fs::remove_dir_all(dir);
    }

    /// Every run this node still has.
    pub fn list(&self) -> Vec<RunStatus> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return Vec::new() };
        let mut out: Vec<RunStatus> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .map(|run| self.status(run))
            .collect();
        out.sort_by_key(|s| s.run);
        out
    }

    /// A run's output lengths and exit; a run whose supervisor died without one ends now.
    pub fn status(&self, run: u64) -> RunStatus {
        self.status_of(run, true)
    }

    /// `status` without the look for a dead supervisor (a read of its record and of /proc):
    /// what the output loop reads every 50 ms of each run going. `status`, read at every
    /// report, finds a dead supervisor and writes its run's exit.
    pub fn output_status(&self, run: u64) -> RunStatus {
        self.status_of(run, false)
    }

    fn status_of(&self, run: u64, orphans: bool) -> RunStatus {
        let dir = self.run_dir(run);
        // The exit first: once it is there the job is gone, so the lengths read after it are final.
        let exit = read_exit(&dir).or_else(|| if orphans { self.orphaned(&dir) } else { None });
        let len = |f: &str| fs::metadata(dir.join(f)).map_or(0, |m| m.len());
        RunStatus { run, len: [len("stdout"), len("stderr")], exit }
    }

    /// How many runs are going now.
    pub fn running(&self) -> u64 {
        self.list().iter().filter(|s| s.exit.is_none()).count() as u64
    }
}

impl Runner {
    /// A run whose supervisor is gone without writing its exit ends now, with that reason.
    fn orphaned(&self, dir: &Path) -> Option<Exit> {
        let Some((pid, start)) = read_shim(dir) else {
            // No supervisor was ever recorded: the agent stopped while starting the run.
            let age = fs::metadata(dir).and_then(|m| m.modified()).ok()?.elapsed().ok()?;
            if age < std::time::Duration::from_secs(10) || read_exit(dir).is_some() {
                return None;
            }
            let exit = Exit {
                code: 255,
                signal: None,
                reason: Some("never started (the agent stopped while starting it)".into()),
            };
            write_exit(dir, &exit).ok()?;
            return Some(exit);
        };
        let seen = proc_stat(pid);
        let alive = seen.is_some_and(|(state, started)| started == start && state != 'Z' && state != 'X');
        // The shim writes its exit before it ends: read again now that it is known gone.
        if alive || read_exit(dir).is_some() {
            return None;
        }
        warn!(dir = %dir.display(), pid, ?seen, "run supervisor died without an exit status");
        let exit = Exit { code: 255, signal: None, reason: Some("its supervisor died".into()) };
        write_exit(dir, &exit).ok()?;
        Some(exit)
    }
}

fn write_new(path: &Path, data: &[u8], mode: u32, sync: bool) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    f.write_all(data)?;
    if sync { f.sync_all() } else { Ok(()) }
}

/// The file a signal waits in for a run whose process is not started yet.
pub const PENDING_SIGNAL: &str = "signal";

/// Where the shim records itself, then the job.
const PIDS: &str = "shim.pid";

/// The shim's pid and start time, once recorded.
fn read_shim(dir: &Path) -> Option<(u32, u64)> {
    let pids = fs::read_to_string(dir.join(PIDS)).ok()?;
    let mut f = pids.lines().next()?.split_whitespace();
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// The job's pid, once the shim has appended it (a line is only read whole); a shim of an
/// earlier version wrote it to a file `pid` of its own.
fn read_pid(dir: &Path) -> Option<i32> {
    let pids = fs::read_to_string(dir.join(PIDS)).ok()?;
    match pids.split_inclusive('\n').nth(1) {
        Some(line) => line.strip_suffix('\n')?.trim().parse().ok(),
        None => fs::read_to_string(dir.join("pid")).ok()?.trim().parse().ok(),
    }
}

/// Appends the job's `pid` to the shim's record, in place: no new file per run.
pub fn record_job(dir: &Path, pid: i32) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().append(true).open(dir.join(PIDS))?;
    f.write_all(format!("{pid}\n").as_bytes())
}

/// A signal left for the run by [`Runner::signal`] before its process was started.
pub fn pending_signal(dir: &Path) -> Option<Signal> {
    let n: i32 = fs::read_to_string(dir.join(PENDING_SIGNAL)).ok()?.trim().parse().ok()?;
    Signal::try_from(n).ok()
}

/// Writes `exit.json` atomically: a reader sees the whole status or none. Each writer has its
/// own temporary file; the first complete exit stays. Not synced: it outlives an agent restart
/// in the page cache, and the head has it moments after it is written. A node that loses its
/// power in between reports the run as one whose supervisor died (the request, synced, says
/// the run was started: it is never started again).
pub fn write_exit(dir: &Path, exit: &Exit) -> std::io::Result<()> {
    let tmp = dir.join(format!("exit.json.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, &serde_json::to_vec(exit).expect("exits serialize"), 0o600, false)?;
    let done = dir.join("exit.json");
    // A hard link fails if an exit is there already, where a rename would replace it.
    let linked = fs::hard_link(&tmp, &done);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Records `pid` as the run's supervisor with its kernel start time (a later process with the
/// same pid is not it), atomically: a reader sees the whole line or no file. The first record
/// stays (the agent and the shim both write it when the shim is started by exec), so the job's
/// pid appended to it is never replaced.
pub fn record_shim(dir: &Path, pid: u32) -> std::io::Result<()> {
    let start = proc_stat(pid).map_or(0, |s| s.1);
    let tmp = dir.join(format!("{PIDS}.{}", std::process::id()));
    fs::write(&tmp, format!("{pid} {start}\n"))?;
    let linked = fs::hard_link(&tmp, dir.join(PIDS));
    let _ = fs::remove_file(&tmp);
    match linked {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// (state, start time in clock ticks) of a process, from /proc/<pid>/stat.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    Some((fields.first()?.chars().next()?, fields.get(19)?.parse().ok()?))
}

pub fn read_exit(dir: &Path) -> Option<Exit> {
    serde_json::from_slice(&fs::read(dir.join("exit.json")).ok()?).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A root run of `true`.
    pub(crate) fn run(n: u64) -> Run {
        Run {
            run: n,
            script: "true\n".into(),
            uid: 0,
            gid: 0,
            groups: vec![],
            user: "root".into(),
            env: Default::default(),
            cwd: None,
            timeout_s: None,
            isolate: clusterfs::jobs::Isolate::None,
            rootfs: None,
            cpus: 1,
            mem: None,
            copy: None,
        }
    }

    #[test]
    fn a_run_is_started_once_and_listed_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let r = Runner::new(dir.path().join("runs")).unwrap();
        // The shim is this test binary, which does not know --shim: it ends at once without an
        // exit status, but the run was started exactly once and is listed.
        assert_eq!(r.start(&run(7)).unwrap(), Started::Now);
        assert_eq!(r.start(&run(7)).unwrap(), Started::Before);
        assert_eq!(r.list().iter().map(|s| s.run).collect::<Vec<_>>(), vec![7]);
        // A supervisor gone without an exit status: the run ends as such, once.
        let ended = (0..500).find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            r.status(7).exit
        });
        let ended = ended.expect("the run never ended");
        assert_eq!((ended.code, ended.reason.as_deref()), (255, Some("its supervisor died")));
        // The first complete exit stays.
        write_exit(&r.run_dir(7), &Exit { code: 0, signal: None, reason: None }).unwrap();
        assert_eq!(r.status(7).exit.unwrap().code, 255);
        r.forget(7);
        assert!(r.list().is_empty());
    }

    #[test]
    fn a_signal_before_the_process_waits_for_the_shim() {
        let dir = tempfile::tempdir().unwrap();
        let r = Runner::new(dir.path().join("runs")).unwrap();
        // Unknown run: the head must ask again.
        assert_eq!(r.signal(3, libc::SIGTERM), Ok(false));
        // Known, no process yet: kept for the shim, which reads it once it has the pid.
        fs::create_dir(r.run_dir(3)).unwrap();
        assert_eq!(r.signal(3, libc::SIGTERM), Ok(true));
        assert_eq!(pending_signal(&r.run_dir(3)), Some(Signal::SIGTERM));
        // The head's SIGKILL a second later does not replace it: the shim escalates.
        assert_eq!(r.signal(3, libc::SIGKILL), Ok(true));
        assert_eq!(pending_signal(&r.run_dir(3)), Some(Signal::SIGTERM));
        assert_eq!(r.signal(3, libc::SIGINT), Ok(true));
        assert_eq!(pending_signal(&r.run_dir(3)), Some(Signal::SIGINT));
        assert!(r.signal(3, 999).unwrap_err().contains("no signal 999"));
    }
}
