//! nodes/: live sitreps, sets, state, drain/resume, down after missed reports, ping.

use std::time::{Duration, Instant};

use crate::harness::{Cluster, eventually, sh, sh_as, signal};
use clusterfs::sitrep::KEYS;

#[test]
fn sitrep_has_every_key_in_order_in_three_formats() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn[0-2]", 200);
    assert_eq!(c.read("nodes/all"), "cn[0-2]\n");
    assert_eq!(c.read("nodes/down"), "\n");
    assert_eq!(c.read("nodes/drained"), "\n");
    assert!(["cn0\n", "cn1\n", "cn2\n"].contains(&c.read("nodes/best").as_str()));
    let text = c.read("nodes/cn1/sitrep");
    let lines: Vec<(&str, &str)> = text.lines().map(|l| l.split_once(' ').expect("key value")).collect();
    assert_eq!(lines.iter().map(|l| l.0).collect::<Vec<_>>(), KEYS.iter().map(|k| k.0).collect::<Vec<_>>());
    for (k, v) in &lines {
        match *k {
            "name" => assert_eq!(*v, "cn1"),
            "state" => assert_eq!(*v, "up"),
            "agent_version" => assert_eq!(*v, env!("CARGO_PKG_VERSION")),
            _ => assert!(v.parse::<f64>().is_ok_and(f64::is_finite), "{k} = {v:?} is not a number"),
        }
    }
    let get = |k: &str| lines.iter().find(|l| l.0 == k).map(|l| l.1.parse::<f64>().unwrap()).unwrap();
    assert!(get("mem_total") > get("mem_avail") && get("mem_avail") > 0.0);
    assert!(get("cpus") >= 1.0 && get("uptime_s") > 0.0 && get("perf_score") > 0.0);
    assert!(get("age_s") < 1.0, "a node reporting every 200 ms has a fresh sitrep");

    let json: serde_json::Value = serde_json::from_str(&c.read("nodes/cn1/sitrep.json")).unwrap();
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    let want: Vec<&str> = KEYS.iter().map(|k| k.0).collect();
    assert_eq!(keys.iter().map(|k| k.as_str()).collect::<Vec<_>>(), want);
    assert_eq!(json["name"], "cn1");
    assert!(json["load1"].is_number() && json["mem_total"].is_u64());

    let metrics = c.read("nodes/cn1/metrics");
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        assert!(line.contains("node=\"cn1\""), "unlabelled sample: {line}");
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    assert!(metrics.contains("clusterfs_node_state{node=\"cn1\",state=\"up\"} 1\n"));
    let status = c.read("status");
    let mut lines = status.lines();
    let leader = lines.next().unwrap_or_default();
    assert!(
        leader.starts_with("leader ") && leader.ends_with(&format!(" addr={} store=embedded", c.addr())),
        "{status}"
    );
    assert_eq!(lines.next(), Some("nodes all=3 up=3 down=0 drained=0"), "{status}");
    assert_eq!(c.read("version"), format!("clusterfs {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn sitrep_is_live() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 100);
    let uptime = |c: &Cluster| -> f64 {
        let s = c.read("nodes/cn0/sitrep");
        s.lines().find_map(|l| l.strip_prefix("uptime_s ")).unwrap().parse().unwrap()
    };
    let first = uptime(&c);
    assert!(eventually(Duration::from_secs(15), || uptime(&c) >= first + 0.3), "uptime_s never advanced");
}

#[test]
fn drain_resume_and_bad_commands() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn[0-2]", 200);
    let (rc, _, err) = sh(&format!("echo 'drain disk swap' > {}", c.path("nodes/cn1/ctl").display()));
    assert_eq!(rc, 0, "{err} {:?}\n{}", c.try_read("nodes/cn1/error"), c.log());
    assert_eq!(c.read("nodes/drained"), "cn1\n");
    assert_eq!(c.read("nodes/up"), "cn[0,2]\n");
    assert_eq!(c.read("nodes/cn1/state"), "drained disk swap\n");
    assert_ne!(c.read("nodes/best"), "cn1\n", "a drained node is never best");

    // Each bad write: EINVAL from write(2), a sentence in error, and nothing changed.
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("unknown verb", b"bogus\n".to_vec(), "unknown verb \"bogus\""),
        ("empty line", b"\n".to_vec(), "empty command"),
        ("NUL byte", b"resume\0\n".to_vec(), "NUL"),
        ("invalid UTF-8", b"drain \xff\xfe\n".to_vec(), "UTF-8"),
        ("resume with args", b"resume now\n".to_vec(), "no argument"),
        ("two lines", b"resume\ndrain x\n".to_vec(), "one command per write"),
        ("1 MiB of garbage", vec![b'x'; 1 << 20], "at most 4096 bytes"),
        ("control chars in reason", b"drain a\x07b\n".to_vec(), "printable"),
    ];
    for (what, data, sentence) in bad {
        assert_eq!(c.write("nodes/cn1/ctl", &data), Err(libc::EINVAL), "{what}");
        let err = c.read("nodes/cn1/error");
        assert!(err.starts_with("EINVAL: ") && err.contains(sentence), "{what}: error file says {err:?}");
        assert_eq!(c.read("nodes/cn1/state"), "drained disk swap\n", "{what} changed the state");
    }
    // The shell sees the write error too.
    let (rc, _, err) = sh(&format!("echo bogus > {}", c.path("nodes/cn1/ctl").display()));
    assert_ne!(rc, 0);
    assert!(err.contains("Invalid argument"), "{err}");

    // Only root drains; a user gets EACCES and the node is untouched.
    let (rc, _, err) = sh_as("nobody", &format!("echo resume > {}", c.path("nodes/cn1/ctl").display()));
    assert_ne!(rc, 0);
    assert!(err.contains("Permission denied"), "{err}");
    assert_eq!(c.read("nodes/cn1/state"), "drained disk swap\n");
    // Another user's error file is their own: root's failures are not shown to nobody.
    let (_, out, _) = sh_as("nobody", &format!("cat {}", c.path("nodes/cn1/error").display()));
    assert_eq!(out, "");

    assert_eq!(c.write("nodes/cn1/ctl", b"resume\n"), Ok(()));
    assert_eq!(c.read("nodes/cn1/state"), "up\n");
    assert_eq!(c.read("nodes/drained"), "\n");
    // A drain without a reason.
    assert_eq!(c.write("nodes/cn2/ctl", b"drain"), Ok(()));
    assert_eq!(c.read("nodes/cn2/state"), "drained\n");
}

#[test]
fn drain_survives_a_head_restart_and_agents_reconnect_by_themselves() {
    if !crate::can_mount() {
        return;
    }
    let mut c = Cluster::up("cn0", 200);
    c.agent("cn7");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn[0,7]\n"));
    c.write("nodes/cn7/ctl", b"drain bad dimm\n").unwrap();
    c.write("groups/pair", b"cn[0,7]\n").unwrap();
    // A job in mount namespaces of its own holds a copy of the mount: the head stops anyway.
    let job = crate::jobs::submit_as(&c, "root", "sleep 60\n");
    crate::jobs::assert_running(&c, job);
    let stopped = c.stop_head();
    assert!(stopped.is_some_and(|s| s.success()), "the head did not stop by itself: {stopped:?}\n{}", c.log());
    assert!(!c.is_mounted(), "SIGTERM unmounts cleanly");
    // The same state and address: cn7's agent process, still running, redials on its own.
    c.start_head();
    assert_eq!(c.read("groups/pair"), "cn[0,7]\n");
    assert!(
        eventually(Duration::from_secs(15), || c.read("nodes/cn7/state") == "drained bad dimm\n"),
        "cn7 reconnected drained; state: {}",
        c.read("nodes/cn7/state")
    );
    assert_eq!(c.read("nodes/all"), "cn[0,7]\n");
}

#[test]
fn hostile_writes_into_every_writable_file_change_nothing() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    c.write("groups/g", b"cn0\n").unwrap();
    let junk: Vec<(&str, Vec<u8>)> = vec![
        ("newline only", b"\n".to_vec()),
        ("spaces", b"   \n".to_vec()),
        ("NUL bytes", b"\0\0\0".to_vec()),
        ("invalid UTF-8", vec![0xc3, 0x28, 0xff]),
        ("partial UTF-8", vec![b'c', b'n', 0xe2, 0x82]),
        ("1 MiB", vec![b'a'; 1 << 20]),
        ("binary", (0u8..=255).collect()),
        ("path tricks", b"../../etc/passwd\n".to_vec()),
        ("4 KiB name", vec![b'n'; 4096]),
    ];
    for file in ["nodes/cn0/ctl", "groups/g"] {
        let dir = file.rsplit_once('/').unwrap().0;
        let before = (c.read("nodes/cn0/state"), c.read("groups/g"), c.read("nodes/all"));
        for (what, data) in &junk {
            let r = c.write(file, data);
            assert_eq!(r, Err(libc::EINVAL), "{file} {what}");
            let err = c.read(&format!("{dir}/error"));
            assert!(err.starts_with("EINVAL: ") && err.len() > 12, "{file} {what}: {err:?}");
            assert_eq!((c.read("nodes/cn0/state"), c.read("groups/g"), c.read("nodes/all")), before, "{file} {what}");
        }
    }
    assert_eq!(c.read("nodes/up"), "cn0\n", "the head is alive");
}

#[test]
fn node_goes_down_after_missed_reports_and_comes_back() {
    if !crate::can_mount() {
        return;
    }
    let mut c = Cluster::up("cn0", 100);
    let a = c.agent("cn9");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn[0,9]\n"), "cn9 never came up");
    // A stopped (not dead) agent keeps its TCP connection but stops reporting.
    signal(c.agent_pid(a), libc::SIGSTOP);
    let stopped = Instant::now();
    assert!(eventually(Duration::from_secs(15), || c.read("nodes/down") == "cn9\n"));
    let took = stopped.elapsed();
    // The last report may be up to one interval old when the agent stops.
    assert!(took >= Duration::from_millis(600), "down after 8 missed 100 ms intervals, not at once ({took:?})");
    assert!(c.read("nodes/cn9/state").starts_with("down no report for"), "{}", c.read("nodes/cn9/state"));
    // ping to a down node: EHOSTDOWN and a sentence.
    let err = std::fs::read_to_string(c.path("nodes/cn9/ping")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EHOSTDOWN));
    let sentence = c.read("nodes/cn9/error");
    assert!(sentence.starts_with("EHOSTDOWN: node cn9 is down (no report for"), "{sentence:?}");
    signal(c.agent_pid(a), libc::SIGCONT);
    assert!(eventually(Duration::from_secs(15), || c.read("nodes/up") == "cn[0,9]\n"), "cn9 never came back");
    // A killed agent: down at once (the connection closed), and up again when it returns.
    c.kill_agent(a);
    assert!(eventually(Duration::from_secs(15), || c.read("nodes/cn9/state").starts_with("down")));
    c.agent("cn9");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/cn9/state") == "up\n"));
}

#[test]
fn ping_measures_a_round_trip() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn[0-1]", 200);
    let p = c.read("nodes/cn1/ping");
    let ms: f64 = p.strip_suffix(" ms\n").unwrap_or_else(|| panic!("{p:?}")).parse().unwrap();
    assert!(ms > 0.0 && ms < 1000.0, "{p}");
}

#[test]
fn slow_agents_never_hold_fuse_threads() {
    if !crate::can_mount() {
        return;
    }
    let mut c = Cluster::up("cn0", 200);
    let a = c.agent("cn5");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn[0,5]\n"));
    // SIGSTOP the agent just after its report: pings wait for it (up to the 1 s timeout).
    signal(c.agent_pid(a), libc::SIGSTOP);
    let pid = c.agent_pid(a);
    let stopped = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('T'))
    };
    assert!(eventually(Duration::from_secs(15), stopped), "the agent did not stop");
    let ping = c.path("nodes/cn5/ping");
    let pings: Vec<_> = (0..12)
        .map(|_| {
            let p = ping.clone();
            std::thread::spawn(move || std::fs::read_to_string(p).map_err(|e| e.raw_os_error()))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    // More pings wait than there are FUSE threads, yet other reads are answered at once.
    let start = Instant::now();
    assert_eq!(c.read("nodes/all"), "cn[0,5]\n");
    let _ = c.read("nodes/cn0/sitrep");
    assert!(start.elapsed() < Duration::from_millis(500), "a read waited behind pings: {:?}", start.elapsed());
    for p in pings {
        let r = p.join().unwrap();
        assert!(matches!(r, Err(Some(libc::ETIMEDOUT)) | Err(Some(libc::EHOSTDOWN))), "{r:?}");
    }
    let err = c.read("nodes/cn5/error");
    assert!(err.starts_with("ETIMEDOUT: node cn5 did not answer") || err.starts_with("EHOSTDOWN: node cn5"), "{err:?}");
    signal(c.agent_pid(a), libc::SIGCONT);
}

#[test]
fn root_forgets_a_decommissioned_node_once_its_agent_is_gone_and_nothing_runs_there() {
    if !crate::can_mount() {
        return;
    }
    crate::jobs::users();
    let mut c = Cluster::up("cn0", 200);
    let a = c.agent("cn7");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn[0,7]\n"));
    let cn7 = c.path("nodes/cn7");
    let rmdir = |who: &str| crate::harness::sh_as(who, &format!("rmdir {}", cn7.display()));
    // Its agent is connected: EBUSY, with the reason.
    assert_eq!(std::fs::remove_dir(&cn7).map_err(|e| e.raw_os_error()), Err(Some(libc::EBUSY)));
    assert!(c.read("nodes/error").contains("cn7's agent is connected"), "{}", c.read("nodes/error"));
    // A job running there: EBUSY, naming it, even once the agent is gone.
    c.write("nodes/cn0/ctl", b"drain keep jobs on cn7\n").unwrap();
    let id = crate::jobs::submit_as(&c, "root", "sleep 60\n");
    assert!(eventually(Duration::from_secs(15), || c.read(&format!("jobs/{id}/state")).starts_with("running on cn7")));
    assert_eq!(std::fs::remove_dir(&cn7).map_err(|e| e.raw_os_error()), Err(Some(libc::EBUSY)));
    assert!(c.read("nodes/error").contains(&format!("jobs {id}")), "{}", c.read("nodes/error"));
    c.write(&format!("jobs/{id}/ctl"), b"kill\n").unwrap();
    assert!(eventually(Duration::from_secs(15), || c.read(&format!("jobs/{id}/state")).starts_with("killed")));
    c.write("nodes/cn0/ctl", b"resume\n").unwrap();
    c.kill_agent(a);
    assert!(eventually(Duration::from_secs(15), || c.read("nodes/down") == "cn7\n"));
    // Users may not; root may, and the node leaves every set, for good.
    let (rc, _, _) = rmdir("cfbob");
    assert_ne!(rc, 0, "a user removed a node");
    let (rc, _, err) = rmdir("root");
    assert_eq!(rc, 0, "{err}{}", c.read("nodes/error"));
    assert_eq!((c.read("nodes/all"), c.read("nodes/down")), ("cn0\n".to_string(), "\n".to_string()));
    assert!(!cn7.exists());
    c.stop_head();
    c.start_head();
    assert_eq!(c.read("nodes/all"), "cn0\n", "a forgotten node came back after a restart");
    // An agent that connects later makes it anew.
    c.agent("cn7");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/all") == "cn[0,7]\n"));
}
