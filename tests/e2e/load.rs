//! Load: 64 shells submitting while find, cat of sitreps and tail -f run, with 1,000 nodes reporting.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{Cluster, eventually};
use crate::jobs::{assert_running, submit_as};

/// How long the shells submit (CLUSTERFS_LOAD_S, default 60).
fn load_time() -> Duration {
    Duration::from_secs(std::env::var("CLUSTERFS_LOAD_S").ok().and_then(|s| s.parse().ok()).unwrap_or(60))
}

/// The `q`-quantile of sorted `xs`.
fn quantile(xs: &[Duration], q: f64) -> Duration {
    xs[((xs.len() - 1) as f64 * q).round() as usize]
}

#[test]
fn sixty_four_shells_submit_while_readers_walk_the_tree_and_1000_nodes_report() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn[0-999]", 1000);
    let mnt = c.mnt.display().to_string();
    // A job that writes a line every 100 ms for the whole run, followed by `tail -f`.
    let ticks = load_time().as_secs() * 10 + 50;
    let ticker = submit_as(&c, "root", &format!("for i in $(seq 1 {ticks}); do echo tick $i; sleep 0.1; done\n"));
    assert_running(&c, ticker);
    let mut tail = Command::new("tail")
        .args(["-f", &format!("{mnt}/jobs/{ticker}/stdout")])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let followed = Arc::new(std::sync::Mutex::new(String::new()));
    let follower = {
        let (followed, mut out) = (followed.clone(), tail.stdout.take().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
                if n == 0 {
                    break;
                }
                followed.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    // 64 shells, each submitting one job after another; each prints its successes and failures.
    let shells: Vec<_> = (0..64)
        .map(|_| {
            let script = format!(
                "ok=0; bad=0; end=$((SECONDS + {})); while [ $SECONDS -lt $end ]; do \
                 if echo 'true' > {mnt}/jobs/new; then ok=$((ok+1)); else bad=$((bad+1)); fi; done; echo $ok $bad",
                load_time().as_secs()
            );
            Command::new("bash").args(["-c", &script]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    // `find` over the whole tree, again and again; each walk must succeed.
    let walks = Arc::new(AtomicU64::new(0));
    let finder = {
        let (stop, walks, mnt) = (stop.clone(), walks.clone(), mnt.clone());
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let out = Command::new("find").arg(&mnt).stdout(Stdio::null()).output().unwrap();
                if !out.status.success() {
                    errors.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
                walks.fetch_add(1, Ordering::Relaxed);
            }
            errors
        })
    };
    // `cat nodes/*/sitrep` in a loop, timing each cat.
    let reader = {
        let (stop, mnt) = (stop.clone(), mnt.clone());
        std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for n in 0..1000 {
                    let t = Instant::now();
                    match std::fs::read_to_string(format!("{mnt}/nodes/cn{n}/sitrep")) {
                        Ok(s) if s.starts_with(&format!("name cn{n}\n")) => lat.push(t.elapsed()),
                        Ok(s) => errors.push(format!("cn{n}: {s:?}")),
                        Err(e) => errors.push(format!("cn{n}: {e}")),
                    }
                }
            }
            (lat, errors)
        })
    };

    let mut submitted = 0u64;
    for s in shells {
        let out = s.wait_with_output().unwrap();
        let counts = String::from_utf8_lossy(&out.stdout);
        let (ok, bad) = counts.trim().split_once(' ').expect("a shell's counts");
        assert_eq!(bad, "0", "a shell's submissions failed: {}", String::from_utf8_lossy(&out.stderr));
        submitted += ok.parse::<u64>().unwrap();
    }
    let submit_time = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let find_errors = finder.join().unwrap();
    let (mut lat, read_errors) = reader.join().unwrap();
    assert!(find_errors.is_empty(), "find failed: {:?}", &find_errors[..find_errors.len().min(3)]);
    assert!(read_errors.is_empty(), "sitrep reads failed: {:?}", &read_errors[..read_errors.len().min(3)]);

    // No deadlock: every job ends, and `tail -f` saw the ticker's lines as they came.
    let drained = eventually(Duration::from_secs(180), || c.read("jobs/queue").lines().count() <= 1);
    assert!(drained, "jobs still queued: {}", c.read("jobs/queue").lines().count());
    // The ticker forks a `sleep` per line: on a loaded machine its lines come slower than 10 a second.
    let ticked = eventually(Duration::from_secs(120), || c.read(&format!("jobs/{ticker}/state")) == "done 0\n");
    assert!(ticked, "the ticker: {}", c.read(&format!("jobs/{ticker}/state")));
    // tail -f polls a FUSE file once a second.
    let want: String = (1..=ticks).map(|i| format!("tick {i}\n")).collect();
    let all = eventually(Duration::from_secs(15), || *followed.lock().unwrap() == want);
    let _ = tail.kill();
    let _ = tail.wait();
    follower.join().unwrap();
    assert!(all, "tail -f missed or repeated lines: {} of {} bytes", followed.lock().unwrap().len(), want.len());
    let ended = c.read("jobs/queue");
    assert_eq!(ended, "", "jobs left: {ended}");

    lat.sort_unstable();
    eprintln!(
        "load: {submitted} jobs submitted by 64 shells in {:.0?} ({:.0}/s); {} find walks; {} sitrep cats: \
         p50 {:.2?} p99 {:.2?} max {:.2?}",
        submit_time,
        submitted as f64 / submit_time.as_secs_f64(),
        walks.load(Ordering::Relaxed),
        lat.len(),
        quantile(&lat, 0.5),
        quantile(&lat, 0.99),
        lat.last().unwrap()
    );
}
