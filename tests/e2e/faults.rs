//! Faults across a real network of namespaces: a partitioned agent, slow and lossy links.

use std::time::{Duration, Instant};

use crate::harness::{Cluster, eventually};
use crate::jobs::{assert_running, submit_as, wait};
use crate::net::Net;

/// The job ids appended to `marks`, sorted: each job appends its own once per run.
pub fn marks(path: &std::path::Path) -> Vec<u64> {
    let mut ids: Vec<u64> =
        std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| l.parse().expect("a job id")).collect();
    ids.sort_unstable();
    ids
}

#[test]
fn a_partitioned_agent_comes_back_up_and_its_jobs_report_their_real_exit() {
    if !crate::can_mount() {
        return;
    }
    let net = Net::new(3);
    let mut c = Cluster::up_in(&net, 0, 200, "");
    let head = c.addr();
    c.agent_on(&net.on(1), &head, &["--name", "cn1"]);
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn1\n"), "{}", c.read("nodes/up"));
    let marks_file = c.dir.path().join("marks");
    std::fs::write(&marks_file, "").unwrap();
    let m = marks_file.display();
    // It writes during the partition and ends, with its own exit, before the link is back.
    let long = submit_as(&c, "root", &format!("echo $CLUSTER_JOB_ID >> {m}; sleep 6; echo finished; exit 3\n"));
    assert_running(&c, long);
    assert_eq!(c.read(&format!("jobs/{long}/state")), "running on cn1\n");
    c.agent_on(&net.on(2), &head, &["--name", "cn2"]);
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn[1-2]\n"), "{}", c.read("nodes/up"));

    net.cut(1);
    let cut = Instant::now();
    let down = eventually(Duration::from_secs(10), || c.read("nodes/cn1/state").starts_with("down"));
    assert!(down, "cn1 never went down: {}", c.read("nodes/cn1/state"));
    // Nothing else stalls: work goes to the node that is still there.
    let others: Vec<u64> =
        (0..5).map(|_| submit_as(&c, "root", &format!("echo $CLUSTER_JOB_ID >> {m}; echo $CLUSTER_NODE\n"))).collect();
    for id in &others {
        assert_eq!(wait(&c, *id), "0\n", "job {id}: {}", c.read(&format!("jobs/{id}/state")));
        assert_eq!(c.read(&format!("jobs/{id}/stdout")), "cn2\n");
    }
    // The cut node's job is not given up on within a partition shorter than lost_after_s.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(cut.elapsed()));
    assert_eq!(c.read(&format!("jobs/{long}/state")), "running on cn1\n");
    assert!(c.read("nodes/cn1/state").starts_with("down"));

    net.heal(1);
    let healed = Instant::now();
    let back = eventually(Duration::from_secs(30), || c.read("nodes/up") == "cn[1-2]\n");
    assert!(back, "cn1 did not come back: {}\n{}", c.read("nodes/cn1/state"), c.log());
    eprintln!("partition: cn1 up {:?} after the heal", healed.elapsed());
    // Its job reports the exit it really had, with the output it wrote while cut off.
    assert_eq!(wait(&c, long), "3\n", "{}", c.read(&format!("jobs/{long}/state")));
    assert_eq!(c.read(&format!("jobs/{long}/stdout")), "finished\n");
    let mut want = others.clone();
    want.push(long);
    want.sort_unstable();
    assert_eq!(marks(&marks_file), want, "each job ran exactly once");
    // And the node takes work again.
    c.write("nodes/cn2/ctl", b"drain\n").unwrap();
    let after = submit_as(&c, "root", "echo $CLUSTER_NODE\n");
    assert_eq!(wait(&c, after), "0\n");
    assert_eq!(c.read(&format!("jobs/{after}/stdout")), "cn1\n");
}

#[test]
fn with_300_ms_latency_and_5_percent_loss_on_every_link_everything_completes() {
    if !crate::can_mount() {
        return;
    }
    let net = Net::new(4);
    // The default report interval: a node is down after 3 s without a report. (With 200 ms, a
    // report held up by one TCP retransmission over a 600 ms round trip makes a node look down.)
    let mut c = Cluster::up_in(&net, 0, 1000, "");
    // Agents reach the head through a relay that holds each byte 300 ms each way.
    let head: std::net::SocketAddr = c.addr().parse().unwrap();
    net.slow_relay(0, 7071, head, Duration::from_millis(300));
    net.lossy(5);
    let via = format!("{}:7071", net.ip(0));
    for i in 1..4 {
        c.agent_on(&net.on(i), &via, &["--name", &format!("cn{i}")]);
    }
    let start = Instant::now();
    let up = eventually(Duration::from_secs(60), || c.read("nodes/up") == "cn[1-3]\n");
    assert!(up, "{}\n{}", c.read("nodes/up"), c.log());
    let marks_file = c.dir.path().join("marks");
    std::fs::write(&marks_file, "").unwrap();
    let m = marks_file.display();
    let ids: Vec<u64> =
        (0..30).map(|_| submit_as(&c, "root", &format!("echo $CLUSTER_JOB_ID >> {m}; seq 1 20000\n"))).collect();
    let spread = submit_as(&c, "root", "#CLUSTER nodes=cn[1-3]\necho $CLUSTER_NODE\n");
    let seq: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    for id in &ids {
        assert_eq!(wait(&c, *id), "0\n", "job {id}: {}", c.read(&format!("jobs/{id}/state")));
        assert!(c.read(&format!("jobs/{id}/stdout")) == seq, "job {id}: output incomplete");
    }
    let w = wait(&c, spread);
    let per_node: Vec<String> =
        (1..4).map(|i| c.try_read(&format!("jobs/{spread}/nodes/cn{i}/state")).unwrap_or_default()).collect();
    assert_eq!(w, "0\n", "{} {per_node:?}\n{}", c.read(&format!("jobs/{spread}/state")), c.log());
    for i in 1..4 {
        assert_eq!(c.read(&format!("jobs/{spread}/nodes/cn{i}/stdout")), format!("cn{i}\n"));
        assert!(c.read(&format!("nodes/cn{i}/sitrep")).starts_with("name cn"), "sitrep of cn{i}");
    }
    let mut want = ids.clone();
    want.sort_unstable();
    assert_eq!(marks(&marks_file), want, "each job ran exactly once");
    assert_eq!(c.read("nodes/up"), "cn[1-3]\n");
    eprintln!("slow and lossy: 31 jobs done {:?} after the agents started", start.elapsed());
}

#[test]
fn a_head_crash_under_mixed_load_ends_each_piece_of_work_exactly_once() {
    if !crate::can_mount() {
        return;
    }
    // A head alone, and agents of their own that outlive it (`clusterfs up`'s end with it).
    // Reports every second: making the 256 MiB source below can stall the agents' reports on
    // a loaded machine, and a node taken for down fails the copy at once.
    let mut c = Cluster::up_with("", 1000, "[hsm]\nclient_grace_ms = 60000\n");
    for w in ["w1", "w2"] {
        c.agent(w);
    }
    let hsm_log = c.dir.path().join("hsm.log");
    let cmd = format!("echo $CLUSTER_HSM_COOKIE >> {}; sleep 0.05", hsm_log.display());
    c.agent_with(&["--name", "m1", "--mover", "--mover-command", &cmd, "--max-archive", "4"]);
    let ready = eventually(Duration::from_secs(20), || {
        c.read("nodes/up") == "m1,w[1-2]\n" && c.try_read("hsm/movers/m1/state").is_some_and(|s| s == "up\n")
    });
    assert!(ready, "{}", c.read("nodes/up"));

    // The copy's source first: making it loads the machine.
    let src = c.dir.path().join("src.bin");
    let dest = c.dir.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let (rc, _, err) = crate::harness::sh(&format!("head -c 256M /dev/urandom > {}", src.display()));
    assert_eq!(rc, 0, "{err}");

    // 300 HSM archive requests, 40 jobs and a 256 MiB copy to both workers, all in flight at once.
    let marks_file = c.dir.path().join("marks");
    std::fs::write(&marks_file, "").unwrap();
    let m = marks_file.display();
    let requests: String = (1..=300u32)
        .map(|i| format!("{{\"fid\":\"0x200000401:{i:#x}:0x0\",\"cookie\":{i},\"action\":\"archive\"}}\n"))
        .collect();
    c.write("hsm/queue", requests.as_bytes()).unwrap();
    let jobs: Vec<u64> =
        (0..40).map(|i| submit_as(&c, "root", &format!("sleep 0.{}; echo $CLUSTER_JOB_ID >> {m}\n", i % 10))).collect();
    let copy = submit_as(
        &c,
        "root",
        &format!("#CLUSTER nodes=w[1-2] copy={} dest={}/%n.bin fanout=1\n", src.display(), dest.display()),
    );
    let under_way = eventually(Duration::from_secs(30), || {
        std::fs::read_to_string(&hsm_log).is_ok_and(|l| (20..300).contains(&l.lines().count()))
            && c.read(&format!("jobs/{copy}/state")).starts_with("running")
    });
    assert!(
        under_way,
        "the work never got going: copy {:?} ({:?}), {} HSM requests ran",
        c.read(&format!("jobs/{copy}/state")),
        c.try_read(&format!("jobs/{copy}/summary")),
        std::fs::read_to_string(&hsm_log).unwrap_or_default().lines().count()
    );

    let copy_state = c.read(&format!("jobs/{copy}/state"));
    let hsm_ran = std::fs::read_to_string(&hsm_log).unwrap().lines().count();
    let jobs_ran = marks(&marks_file).len();
    c.crash_head();
    c.start_head();
    eprintln!(
        "mixed load: at the crash {jobs_ran} of 40 jobs and {hsm_ran} of 300 HSM requests had run; copy {copy_state:?}"
    );

    for id in &jobs {
        assert_eq!(wait(&c, *id), "0\n", "job {id}: {}", c.read(&format!("jobs/{id}/state")));
    }
    let mut want = jobs.clone();
    want.sort_unstable();
    assert_eq!(marks(&marks_file), want, "each job ran exactly once");
    assert_eq!(wait(&c, copy), "0\n", "{}", c.read(&format!("jobs/{copy}/summary")));
    for w in ["w1", "w2"] {
        let same = crate::harness::sh(&format!("cmp {} {}/{w}.bin", src.display(), dest.display())).0 == 0;
        assert!(same, "the copy on {w} differs from its source");
    }
    let all_ran = eventually(Duration::from_secs(60), || {
        std::fs::read_to_string(&hsm_log).is_ok_and(|l| l.lines().count() >= 300)
            && c.read("hsm/status").contains("archive queued 0 running 0")
    });
    assert!(all_ran, "{}", c.read("hsm/status"));
    std::thread::sleep(Duration::from_millis(500));
    let ran = std::fs::read_to_string(&hsm_log).unwrap();
    let hex = |l: &str| u32::from_str_radix(l.trim_start_matches("0x"), 16).expect("a cookie");
    let mut cookies: Vec<u32> = ran.lines().map(hex).collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (1..=300).collect::<Vec<_>>(), "each HSM request ran exactly once");
    assert_eq!(c.read("jobs/queue"), "");
}
