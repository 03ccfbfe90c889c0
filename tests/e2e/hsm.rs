//! hsm/: requests queued as Lustre prints them, moved by real mover agents, reported per hint.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::can_mount;
use crate::harness::{Cluster, eventually, sh_as, signal};

const HEADER: &str = "mdt.lustre0-MDT0000.hsm.active_requests=\n";

fn fid(oid: u32) -> String {
    format!("[0x200000401:{oid:#x}:0x0]")
}

/// One `active_requests` line, exactly as Lustre prints it.
fn line(oid: u32, cookie: u64, action: &str, data: &str) -> String {
    let f = fid(oid);
    let hex: String = data.bytes().map(|b| format!("{b:02X}")).collect();
    format!(
        "fid={f} dfid={f} compound/cookie=0x0/{cookie:#x} action={action} archive#=1 flags=0x0 extent=0x0-0xffffffffffffffff gid=0x0 data=[{hex}] canceled=0 uuid=0e12f0a4-1b2c-4d5e-8f90-a1b2c3d4e5f6 done=0\n"
    )
}

/// A Lustre-like tree (`.lustre/fid/<fid>` files) and an archive root, under the test dir.
struct Tree {
    lustre: PathBuf,
    archive: PathBuf,
}

impl Tree {
    fn new(c: &Cluster) -> Tree {
        let root = c.path("").parent().expect("the mountpoint is in the test dir").join("hsm");
        let lustre = root.join("lustre");
        fs::create_dir_all(lustre.join(".lustre/fid")).unwrap();
        let archive = root.join("archive");
        fs::create_dir_all(&archive).unwrap();
        Tree { lustre, archive }
    }

    fn file(&self, oid: u32) -> PathBuf {
        self.lustre.join(".lustre/fid").join(fid(oid))
    }

    fn archived(&self, mover: &str, oid: u32) -> PathBuf {
        self.archive.join(mover).join("0x200000401").join(format!("0x200000401:{oid:#x}:0x0"))
    }

    fn mover_args<'a>(&'a self, name: &'a str, extra: &[&'a str]) -> Vec<String> {
        let mut v = vec![
            "--name".to_string(),
            name.to_string(),
            "--mover".into(),
            "--lustre-root".into(),
            self.lustre.display().to_string(),
            "--archive-root".into(),
            self.archive.join("%n").display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

fn start_mover(c: &mut Cluster, args: &[String]) -> usize {
    let name = args[1].clone();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let i = c.agent_with(&args);
    let up = eventually(Duration::from_secs(20), || {
        c.try_read(&format!("hsm/movers/{name}/state")).is_some_and(|s| s == "up\n")
    });
    assert!(up, "mover {name} never came up; head log:\n{}", c.log());
    i
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn wait_for(c: &Cluster, rel: &str, what: &str, timeout_s: u64) -> String {
    let mut last = String::new();
    let ok = eventually(Duration::from_secs(timeout_s), || {
        last = c.try_read(rel).unwrap_or_default();
        last.contains(what)
    });
    assert!(
        ok,
        "{rel} never held {what:?}; it holds {last:?}; status:\n{}",
        c.try_read("hsm/status").unwrap_or_default()
    );
    last
}

fn quiet(c: &Cluster) -> bool {
    c.try_read("hsm/status").is_some_and(|s| {
        ["restore", "remove", "archive"].iter().all(|a| s.contains(&format!("{a} queued 0 running 0 ")))
    })
}

#[test]
fn archive_restore_and_remove_move_real_bytes_and_report_exact_lines() {
    if !can_mount() {
        return;
    }
    let mut c =
        Cluster::up_with("cn1", 200, "[hsm]\nreporting_hint = \"cr\"\nreporting_schedule_interval_ms = 30000\n");
    let t = Tree::new(&c);
    let data = pseudo_random(3 << 20, 7);
    fs::write(t.file(1), &data).unwrap();
    start_mover(&mut c, &t.mover_args("m1", &["--max-archive", "2"]));

    let f = fid(1);
    let queue = format!("{HEADER}{}", line(1, 0x5f1e2d3c, "ARCHIVE", "tag=x,cr=camp1"));
    assert_eq!(c.write("hsm/queue", queue.as_bytes()), Ok(()), "{}", c.read("hsm/error"));
    wait_for(&c, "hsm/camp1", &format!("done {f} 0\n"), 30);
    assert_eq!(fs::read(t.archived("m1", 1)).unwrap(), data, "the archive copy differs from the file");

    // The file's data is released, then restored from the archive.
    fs::write(t.file(1), b"").unwrap();
    c.write("hsm/queue", line(1, 0x5f1e2d3d, "RESTORE", "cr=camp1").as_bytes()).unwrap();
    let restored = |r: String| r.matches(&format!("done {f} 0\n")).count() == 2;
    assert!(eventually(Duration::from_secs(30), || c.try_read("hsm/camp1").is_some_and(restored)));
    assert_eq!(fs::read(t.file(1)).unwrap(), data, "restore did not bring the data back");

    c.write("hsm/queue", line(1, 0x5f1e2d3e, "REMOVE", "cr=camp1").as_bytes()).unwrap();
    assert!(eventually(Duration::from_secs(30), || !t.archived("m1", 1).exists()), "remove left the archive copy");
    let one = |_: &str| format!("new {f}\nassign {f} m1\nsent {f} m1\ndone {f} 0\n");
    let want = one("archive") + &one("restore") + &one("remove");
    let ok = eventually(Duration::from_secs(10), || c.try_read("hsm/camp1").is_some_and(|r| r == want));
    assert!(ok, "hsm/camp1 holds {:?}, not {want:?}", c.try_read("hsm/camp1"));
    // True size, for tail -f and NFS readers.
    assert_eq!(fs::metadata(c.path("hsm/camp1")).unwrap().len() as usize, want.len());
    let status = c.read("hsm/status");
    assert!(status.contains("archive queued 0 running 0 done 1 failed 0"), "{status}");
    assert!(status.contains("mover m1 up restore 0/- remove 0/- archive 0/2 running 0"), "{status}");
    assert_eq!(c.read("hsm/movers/m1/archive_ids"), "any\n");
}

#[test]
fn bad_lines_are_refused_one_by_one_while_good_ones_queue_and_reports_follow_the_queue() {
    if !can_mount() {
        return;
    }
    let mut c = Cluster::up_with("cn1", 200, "[hsm]\nreporting_hint = \"cr\"\nreporting_schedule_interval_ms = 300\n");
    let t = Tree::new(&c);
    c.write("hsm/ctl", b"lock\n").unwrap();
    let good: String = (1..=5).map(|i| line(i, 100 + u64::from(i), "ARCHIVE", "cr=held")).collect();
    let broken = [
        line(9, 9, "ARCHIVE", "").replace("fid=[0x200000401:0x9:0x0] ", "fid=[0x2zz:0x9:0x0] "),
        line(9, 9, "ARCHIVE", "").replace("compound/cookie=0x0/0x9", "compound/cookie=0x9"),
        line(9, 9, "ARCHIVAL", ""),
        line(9, 9, "ARCHIVE", "").replace("archive#=1", "archive#=x"),
        line(9, 9, "ARCHIVE", "").replace("extent=0x0-0xffffffffffffffff", "extent=7"),
        line(9, 9, "ARCHIVE", "").replace("data=[]", "data=[4"),
        line(9, 9, "ARCHIVE", "")[..80].to_string() + "\n",
    ];
    let mut text = String::from(HEADER);
    let mut lines = good.lines();
    for b in &broken {
        text += lines.next().map(|l| format!("{l}\n")).unwrap_or_default().as_str();
        text += b;
    }
    // One write: the good lines of it queue, each bad line is named.
    let e = c.write("hsm/queue", text.as_bytes());
    assert_eq!(e, Err(libc::EINVAL));
    let err = c.read("hsm/error");
    assert!(err.contains("line 3: fid") && err.contains("line 5: compound/cookie"), "{err}");
    assert!(err.contains("and 2 more"), "{err}");
    let status = c.read("hsm/status");
    assert!(status.contains("state locked"), "{status}");
    assert!(status.contains("archive queued 5 running 0"), "{status}");
    // A 1 MiB line spans many writes: refused by the write that takes it past 64 KiB; the
    // line before it is queued.
    let huge = line(6, 106, "ARCHIVE", "cr=big") + &"x".repeat(1 << 20) + "\n" + &line(7, 107, "ARCHIVE", "cr=big");
    assert_eq!(c.write("hsm/queue", huge.as_bytes()), Err(libc::EINVAL));
    assert!(c.read("hsm/error").contains("line 2: a line is at most 65536 bytes"), "{}", c.read("hsm/error"));
    assert!(eventually(Duration::from_secs(15), || c.read("hsm/status").contains("archive queued 6 running 0")));
    c.write("hsm/ctl", b"cancel 106\n").unwrap();
    // Requeueing the same lines queues nothing twice.
    let again = t.archive.join("again");
    fs::write(&again, &good).unwrap();
    let q = c.path("hsm/queue");
    let (code, out, _) = sh_as("root", &format!("exec 3<>{}; cat {} >&3; cat <&3", q.display(), again.display()));
    assert_eq!(code, 0);
    assert_eq!(out, "queued 0 duplicate 5 canceled 0\n");
    // Only root acts on the coordinator.
    crate::jobs::users();
    let (code, _, _) = sh_as("cfalice", &format!("echo unlock > {}", c.path("hsm/ctl").display()));
    assert_ne!(code, 0);
    assert_eq!(c.write("hsm/ctl", b"frobnicate\n"), Err(libc::EINVAL));
    assert!(c.read("hsm/error").contains("lock | unlock | drain <mover>"));

    // While locked the requests wait, and say where they are in the queue.
    let f1 = fid(1);
    wait_for(&c, "hsm/held", &format!("progress {f1} global_queue 1/5\n"), 10);
    // Cancel one queued request.
    c.write("hsm/ctl", b"cancel 0x65\n").unwrap();
    wait_for(&c, "hsm/held", &format!("done {f1} 125\n"), 5);
    assert_eq!(c.write("hsm/ctl", b"cancel 0x65\n"), Err(libc::ENOENT));

    for i in 2..=5 {
        fs::write(t.file(i), pseudo_random(1000 * i as usize, u64::from(i))).unwrap();
    }
    start_mover(&mut c, &t.mover_args("m1", &[]));
    c.write("hsm/ctl", b"unlock\n").unwrap();
    // The mover runs them at once: they end in any order.
    let mut report = String::new();
    for i in 2..=5 {
        report = wait_for(&c, "hsm/held", &format!("done {} 0\n", fid(i)), 30);
    }
    for i in 2..=5 {
        let f = fid(i);
        let at = |l: &str| report.find(l).unwrap_or_else(|| panic!("no {l:?} in {report}"));
        assert!(at(&format!("new {f}\n")) < at(&format!("assign {f} m1\n")));
        assert!(at(&format!("assign {f} m1\n")) < at(&format!("sent {f} m1\n")));
        assert!(at(&format!("sent {f} m1\n")) < at(&format!("done {f} 0\n")));
        assert_eq!(fs::read(t.archived("m1", i)).unwrap(), fs::read(t.file(i)).unwrap());
    }
    assert!(report.ends_with('\n'));
    // One interval after its last request the report file goes.
    assert!(eventually(Duration::from_secs(15), || !c.path("hsm/held").exists()), "the report file stayed");
}

#[test]
fn archive_on_hosts_pins_a_tag_and_drain_moves_work_away() {
    if !can_mount() {
        return;
    }
    let mut c = Cluster::up_with("cn1", 200, "[hsm]\narchive_on_hosts = [\"tag=gold m2\"]\n");
    let t = Tree::new(&c);
    for i in 1..=12 {
        fs::write(t.file(i), format!("file {i}\n")).unwrap();
    }
    start_mover(&mut c, &t.mover_args("m1", &[]));
    start_mover(&mut c, &t.mover_args("m2", &[]));
    let gold: String = (1..=6).map(|i| line(i, u64::from(i), "ARCHIVE", "tag=gold")).collect();
    c.write("hsm/queue", gold.as_bytes()).unwrap();
    assert!(eventually(Duration::from_secs(30), || quiet(&c) && (1..=6).all(|i| t.archived("m2", i).exists())));
    assert!((1..=6).all(|i| !t.archived("m1", i).exists()), "a pinned tag went to m1");

    c.write("hsm/ctl", b"drain m1\n").unwrap();
    assert_eq!(c.read("hsm/movers/m1/state"), "drained\n");
    let plain: String = (7..=12).map(|i| line(i, u64::from(i), "ARCHIVE", "")).collect();
    c.write("hsm/queue", plain.as_bytes()).unwrap();
    assert!(eventually(Duration::from_secs(30), || quiet(&c) && (7..=12).all(|i| t.archived("m2", i).exists())));
    assert!((7..=12).all(|i| !t.archived("m1", i).exists()), "a drained mover got work");
    assert_eq!(c.write("hsm/ctl", b"drain nosuch\n"), Err(libc::ENOENT));
}

#[test]
fn a_head_crash_with_a_thousand_queued_requests_ends_each_exactly_once() {
    if !can_mount() {
        return;
    }
    let mut c = Cluster::up_with(
        "cn1",
        200,
        "[hsm]\nclient_grace_ms = 60000\nreporting_hint = \"cr\"\nreporting_schedule_interval_ms = 500\n",
    );
    let t = Tree::new(&c);
    let log = t.archive.join("ran.log");
    // An external mover command (lhsmtool_cmd style) that records each request it runs.
    let cmd = format!("echo $CLUSTER_HSM_COOKIE >> {}; sleep 0.005", log.display());
    for m in ["m1", "m2"] {
        let args = vec![
            "--name".to_string(),
            m.into(),
            "--mover".into(),
            "--mover-command".into(),
            cmd.clone(),
            "--max-archive".into(),
            "8".into(),
        ];
        start_mover(&mut c, &args);
    }
    let json: String = (1..=1000u32)
        .map(|i| {
            format!(
                "{{\"fid\":\"0x200000401:{i:#x}:0x0\",\"cookie\":{i},\"action\":\"archive\",\"data\":\"cr=crash\"}}\n"
            )
        })
        .collect();
    c.write("hsm/queue", json.as_bytes()).unwrap();
    assert!(eventually(Duration::from_secs(30), || fs::read_to_string(&log).is_ok_and(|l| l.lines().count() >= 100)));
    assert!(c.path("hsm/crash").exists(), "no report file while requests run");
    c.crash_head();
    c.start_head();
    let ok = eventually(Duration::from_secs(120), || {
        quiet(&c) && fs::read_to_string(&log).is_ok_and(|l| l.lines().count() >= 1000)
    });
    let ran = fs::read_to_string(&log).unwrap();
    assert!(
        ok,
        "not all requests ended: {} ran; status:\n{}",
        ran.lines().count(),
        c.try_read("hsm/status").unwrap_or_default()
    );
    let mut times: HashMap<&str, usize> = HashMap::new();
    for l in ran.lines() {
        *times.entry(l).or_default() += 1;
    }
    assert_eq!(times.len(), 1000, "some requests never ran");
    let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "requests ran twice: {twice:?}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fs::read_to_string(&log).unwrap().lines().count(), 1000, "a request ran again late");
    // The report file outlived the crash while its requests did, and goes one interval after.
    assert!(eventually(Duration::from_secs(15), || !c.path("hsm/crash").exists()), "the report file stayed");
}

#[test]
fn running_requests_cancel_move_after_the_grace_and_owners_share_fairly() {
    if !can_mount() {
        return;
    }
    let mut c = Cluster::up_with(
        "cn1",
        200,
        "[hsm]\nreporting_hint = \"cr\"\nclient_grace_ms = 1500\nfair_share = true\nreporting_schedule_interval_ms = 60000\n",
    );
    let t = Tree::new(&c);
    let log = t.archive.join("ran.log");
    // m1 takes a request and never finishes it; m2 records what it runs, one at a time.
    let m1 = {
        let i = c.agent_with(&["--name", "m1", "--mover", "--mover-command", "sleep 300"]);
        assert!(eventually(Duration::from_secs(20), || c.try_read("hsm/movers/m1/state").is_some_and(|s| s == "up\n")));
        i
    };
    let json = |cookie: u32, uid: u32, hint: &str| {
        format!(
            "{{\"fid\":\"0x200000401:{cookie:#x}:0x0\",\"cookie\":{cookie},\"action\":\"archive\",\"data\":\"cr={hint}\",\"uid\":{uid}}}\n"
        )
    };
    // A running request is canceled by its mover: it ends with ECANCELED at once.
    c.write("hsm/queue", json(1, 0, "stop").as_bytes()).unwrap();
    wait_for(&c, "hsm/stop", &format!("sent {} m1\n", fid(1)), 10);
    c.write("hsm/ctl", b"cancel 1\n").unwrap();
    wait_for(&c, "hsm/stop", &format!("done {} 125\n", fid(1)), 10);

    // A request held by a mover that goes away is queued again after client_grace_ms.
    c.write("hsm/queue", json(2, 0, "moved").as_bytes()).unwrap();
    wait_for(&c, "hsm/moved", &format!("sent {} m1\n", fid(2)), 10);
    c.kill_agent(m1);
    let cmd = format!("echo $CLUSTER_HSM_COOKIE >> {}", log.display());
    let m2 = vec![
        "--name".to_string(),
        "m2".into(),
        "--mover".into(),
        "--mover-command".into(),
        cmd,
        "--max-archive".into(),
        "1".into(),
    ];
    c.write("hsm/ctl", b"lock\n").unwrap();
    start_mover(&mut c, &m2);
    c.write("hsm/ctl", b"unlock\n").unwrap();
    wait_for(&c, "hsm/moved", &format!("sent {} m2\ndone {} 0\n", fid(2), fid(2)), 20);

    // Fair share: uid 1000 queued four before uid 2000's two; one slot alternates between them.
    c.write("hsm/ctl", b"lock\n").unwrap();
    let mut q = String::new();
    for i in 10..14 {
        q += &json(i, 1000, "fair");
    }
    for i in 20..22 {
        q += &json(i, 2000, "fair");
    }
    c.write("hsm/queue", q.as_bytes()).unwrap();
    c.write("hsm/ctl", b"unlock\n").unwrap();
    assert!(eventually(Duration::from_secs(20), || quiet(&c)));
    let ran: Vec<String> = fs::read_to_string(&log).unwrap().lines().map(str::to_string).collect();
    assert_eq!(ran, ["0x2", "0xa", "0x14", "0xb", "0x15", "0xc", "0xd"], "not served in fair turns");
}

#[test]
fn a_mover_told_to_stop_interrupts_its_copies_and_exits_and_the_request_runs_once_when_it_is_back() {
    if !can_mount() {
        return;
    }
    let mut c = Cluster::up_with("cn1", 200, "[hsm]\nreporting_hint = \"cr\"\n");
    let t = Tree::new(&c);
    let log = t.archive.join("ran.log");
    let slow: Vec<String> = ["--name", "m1", "--mover", "--mover-command", "sleep 299"].map(String::from).to_vec();
    let m1 = start_mover(&mut c, &slow);
    let json = "{\"fid\":\"0x200000401:0x7:0x0\",\"cookie\":7,\"action\":\"archive\",\"data\":\"cr=stop\"}\n";
    c.write("hsm/queue", json.as_bytes()).unwrap();
    wait_for(&c, "hsm/stop", &format!("sent {} m1\n", fid(7)), 10);
    // SIGTERM (systemctl stop): the copy under way is stopped, not waited for (its end could
    // not be told: the connection goes with the stop).
    let pid = c.agent_pid(m1);
    signal(pid, libc::SIGTERM);
    let exited = eventually(Duration::from_secs(5), || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_or(true, |s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
    });
    assert!(exited, "a mover told to stop waited for its copy");
    c.kill_agent(m1);
    let left = std::process::Command::new("pgrep").args(["-f", "sleep 299"]).output().unwrap();
    assert!(left.stdout.is_empty(), "the copy outlived its mover: {:?}", String::from_utf8_lossy(&left.stdout));
    // Back, holding nothing: the request is sent to it again at once and runs once.
    let cmd = format!("echo $CLUSTER_HSM_COOKIE >> {}", log.display());
    let back: Vec<String> = ["--name", "m1", "--mover", "--mover-command", &cmd].map(String::from).to_vec();
    start_mover(&mut c, &back);
    wait_for(&c, "hsm/stop", &format!("done {} 0\n", fid(7)), 20);
    assert!(eventually(Duration::from_secs(10), || quiet(&c)));
    assert_eq!(fs::read_to_string(&log).unwrap(), "0x7\n");
}

#[test]
fn a_mover_whose_node_stops_reporting_is_given_nothing_and_runs_each_request_once_when_back() {
    if !can_mount() {
        return;
    }
    let mut c = Cluster::up("cn1", 100);
    let t = Tree::new(&c);
    let log = t.archive.join("ran.log");
    let cmd = format!("echo $CLUSTER_HSM_COOKIE >> {}", log.display());
    let args: Vec<String> =
        ["--name", "m1", "--mover", "--mover-command", &cmd, "--max-archive", "4"].map(String::from).to_vec();
    let m1 = start_mover(&mut c, &args);
    // Its node has reported (a mover is up before its first report: stopped then, its node
    // would stay "down connected, no report yet").
    assert!(eventually(Duration::from_secs(20), || c.read("nodes/m1/state") == "up\n"), "{}", c.read("nodes/m1/state"));
    // Stopped, not dead: its connection stays open, its reports stop, its node goes down.
    // Down for 2 s: a report it sent just before it stopped, read late by a head slowed by a
    // loaded machine, would bring it up again for a moment.
    signal(c.agent_pid(m1), libc::SIGSTOP);
    let silent_for = || {
        let state = c.read("nodes/m1/state");
        state.strip_prefix("down no report for ")?.strip_suffix(" s\n")?.parse::<f64>().ok()
    };
    assert!(
        eventually(Duration::from_secs(10), || silent_for().is_some_and(|s| s >= 2.0)),
        "{}",
        c.read("nodes/m1/state")
    );
    let json: String = (1..=20u32)
        .map(|i| format!("{{\"fid\":\"0x200000401:{i:#x}:0x0\",\"cookie\":{i},\"action\":\"archive\"}}\n"))
        .collect();
    c.write("hsm/queue", json.as_bytes()).unwrap();
    // Dispatch rounds come every 250 ms: none of them may hand requests to the down node.
    std::thread::sleep(Duration::from_millis(1000));
    let status = c.read("hsm/status");
    assert!(status.contains("archive queued 20 running 0 "), "requests went to a down node:\n{status}");
    signal(c.agent_pid(m1), libc::SIGCONT);
    let ok = eventually(Duration::from_secs(30), || {
        quiet(&c) && fs::read_to_string(&log).is_ok_and(|l| l.lines().count() >= 20)
    });
    assert!(ok, "not all requests ran once the mover was back; status:\n{}", c.read("hsm/status"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cookies_ran(&log), (1..=20).collect::<Vec<u64>>(), "each request runs exactly once");
}

/// The cookies a mover command logged (`echo $CLUSTER_HSM_COOKIE >> LOG`), sorted.
pub fn cookies_ran(log: &std::path::Path) -> Vec<u64> {
    let mut ran: Vec<u64> = fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| u64::from_str_radix(l.trim_start_matches("0x"), 16).expect("a cookie"))
        .collect();
    ran.sort_unstable();
    ran
}
