//! Multi-node jobs: one command on many nodes, the myclush summary, gathered output, retry-failed.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::harness::{Cluster, Gate, eventually, sh_as};
use crate::jobs::{assert_killed, assert_running, submit_as, users, wait};

fn ls(c: &Cluster, rel: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(c.path(rel))
        .unwrap_or_else(|e| panic!("ls {rel}: {e}"))
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    v.sort();
    v
}

/// A directory every test user may write marks into.
fn marks(c: &Cluster) -> std::path::PathBuf {
    let d = c.dir.path().join("marks");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

#[test]
fn a_command_on_100_nodes_is_summed_up_gathered_and_retried() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn[0-99]", 500);
    let d = marks(&c);
    // cn7 and cn42 fail while their mark is there.
    std::fs::write(d.join("cn7"), "").unwrap();
    std::fs::write(d.join("cn42"), "").unwrap();
    let spec = format!(
        "#CLUSTER nodes=cn[0-99] isolate=none\n\
         while [ -e {m}/hold ]; do sleep 0.05; done\n\
         if [ -e {m}/$CLUSTER_NODE ]; then echo \"broken on $CLUSTER_NODE\" >&2; exit 3; fi\n\
         echo release-1.2; echo \"$CLUSTER_NODE of $CLUSTER_NODES\" >&2\n",
        m = d.display()
    );
    let id = submit_as(&c, "cfalice", &spec);
    let j = format!("jobs/{id}");
    assert_eq!(wait(&c, id), "3\n", "{}", c.read(&format!("{j}/state")));
    assert_eq!(c.read(&format!("{j}/state")), "failed 3 on cn[7,42] (2 of 100 nodes)\n");
    assert_eq!(c.read(&format!("{j}/summary")), "PASS: cn[0-6,8-41,43-99], SUM: 98\nFAILED: cn[7,42], SUM: 2\n");
    assert_eq!(
        c.read(&format!("{j}/output")),
        "---------------\ncn[0-6,8-41,43-99] (98)\n---------------\nrelease-1.2\n\
         ---------------\ncn[7,42] (2) exit 3\n---------------\n"
    );
    assert_eq!(ls(&c, &format!("{j}/nodes")).len(), 100);
    assert_eq!(c.read(&format!("{j}/nodes/cn42/stderr")), "broken on cn42\n");
    assert_eq!(c.read(&format!("{j}/nodes/cn42/exit")), "3\n");
    assert_eq!(c.read(&format!("{j}/nodes/cn42/state")), "failed 3\n");
    assert_eq!(c.read(&format!("{j}/nodes/cn5/stdout")), "release-1.2\n");
    assert_eq!(c.read(&format!("{j}/nodes/cn5/stderr")), "cn5 of cn[0-99]\n");
    assert_eq!(c.read(&format!("{j}/nodes/cn5/state")), "done 0\n");
    // The job's own stdout and stderr: every node's lines, prefixed with its name, as clush
    // and pdsh print them.
    let sorted = |text: String| {
        let mut v: Vec<String> = text.lines().map(String::from).collect();
        v.sort();
        v
    };
    let mut want: Vec<String> =
        (0..100).filter(|n| ![7, 42].contains(n)).map(|n| format!("cn{n}: release-1.2")).collect();
    want.sort();
    assert_eq!(sorted(c.read(&format!("{j}/stdout"))), want);
    let err = sorted(c.read(&format!("{j}/stderr")));
    assert_eq!(err.len(), 100, "{err:?}");
    assert!(err.contains(&"cn42: broken on cn42".to_string()) && err.contains(&"cn5: cn5 of cn[0-99]".to_string()));
    // Anyone may read the summary; only the owner the outputs.
    let (code, out, _) = sh_as("cfbob", &format!("cat {}/summary", c.path(&j).display()));
    assert_eq!((code, out.lines().count()), (0, 2));
    let (code, _, err) = sh_as("cfbob", &format!("cat {}/output", c.path(&j).display()));
    assert!(code != 0 && err.contains("Permission denied"), "{err}");
    let (code, _, err) = sh_as("cfbob", &format!("cat {}/nodes/cn5/stdout", c.path(&j).display()));
    assert!(code != 0 && err.contains("Permission denied"), "{err}");
    let (code, _, _) = sh_as("cfbob", &format!("echo retry-failed > {}/ctl", c.path(&j).display()));
    assert_ne!(code, 0, "another user cannot retry");

    // cn42 is fixed; retry-failed reruns only cn[7,42].
    std::fs::remove_file(d.join("cn42")).unwrap();
    let (code, _, err) = sh_as("cfalice", &format!("echo retry-failed > {}/ctl", c.path(&j).display()));
    assert_eq!(code, 0, "{err}");
    assert_eq!(wait(&c, id), "3\n");
    assert_eq!(c.read(&format!("{j}/summary")), "PASS: cn[0-6,8-99], SUM: 99\nFAILED: cn7, SUM: 1\n");
    assert_eq!(ls(&c, &format!("{j}/attempts")), ["1", "2"]);
    let out = c.read(&format!("{j}/stdout"));
    assert_eq!((out.lines().count(), out.lines().filter(|l| *l == "cn42: release-1.2").count()), (99, 1));
    // A last line with no newline joins the job's stdout when its run ends.
    let two = submit_as(&c, "cfalice", "#CLUSTER nodes=cn[0-2] isolate=none\nprintf 'a\\nb'\n");
    assert_eq!(wait(&c, two), "0\n");
    let out = c.read(&format!("jobs/{two}/stdout"));
    for n in 0..3 {
        let mine: Vec<&str> = out.lines().filter(|l| l.starts_with(&format!("cn{n}: "))).collect();
        assert_eq!(mine, [format!("cn{n}: a"), format!("cn{n}: b")], "{out}");
    }
    assert_eq!(c.read(&format!("jobs/{two}/nodes/cn1/stdout")), "a\nb");
    assert_eq!(c.read(&format!("{j}/attempts/2/summary")), "PASS: cn42, SUM: 1\nFAILED: cn7, SUM: 1\n");
    assert_eq!(ls(&c, &format!("{j}/attempts/2/nodes")), ["cn42", "cn7"]);
    assert_eq!(
        c.read(&format!("{j}/attempts/1/summary")),
        "PASS: cn[0-6,8-41,43-99], SUM: 98\nFAILED: cn[7,42], SUM: 2\n"
    );
    // The first attempt's outputs are kept; the job shows each node's latest run.
    assert_eq!(c.read(&format!("{j}/attempts/1/nodes/cn42/stderr")), "broken on cn42\n");
    assert_eq!(c.read(&format!("{j}/nodes/cn42/stdout")), "release-1.2\n");
    assert_eq!(c.read(&format!("{j}/nodes/cn42/exit")), "0\n");
    assert_eq!(
        c.read(&format!("{j}/output")),
        "---------------\ncn[0-6,8-99] (99)\n---------------\nrelease-1.2\n\
         ---------------\ncn7 (1) exit 3\n---------------\n"
    );

    // Once every node passed, there is nothing to retry.
    // A retry runs on the nodes that did not pass, and its state says so.
    std::fs::remove_file(d.join("cn7")).unwrap();
    std::fs::write(d.join("hold"), "").unwrap();
    assert_eq!(c.write(&format!("{j}/ctl"), b"retry-failed\n"), Ok(()));
    let running = || c.read(&format!("{j}/state")) == "running on cn7 (attempt 3)\n";
    assert!(eventually(Duration::from_secs(10), running), "{}", c.read(&format!("{j}/state")));
    std::fs::remove_file(d.join("hold")).unwrap();
    assert_eq!(wait(&c, id), "0\n");
    assert_eq!(c.read(&format!("{j}/state")), "done 0\n");
    assert_eq!(c.read(&format!("{j}/summary")), "PASS: cn[0-99], SUM: 100\n");
    assert_eq!(c.write(&format!("{j}/ctl"), b"retry-failed\n"), Err(libc::EINVAL));
    assert!(c.read(&format!("{j}/error")).contains("every node passed"), "{}", c.read(&format!("{j}/error")));
}

#[test]
fn down_drained_and_timed_out_nodes_are_named_in_the_summary() {
    if !crate::can_mount() {
        return;
    }
    users();
    let mut c = Cluster::up("cn[0-3]", 200);
    let extra = c.agent("cn9");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn[0-3,9]\n"));
    c.kill_agent(extra);
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/down") == "cn9\n"));
    assert_eq!(c.write("nodes/cn1/ctl", b"drain disk swap\n"), Ok(()));
    let id = submit_as(
        &c,
        "cfalice",
        "#CLUSTER nodes=cn[0-3,9] timeout=15\ncase $CLUSTER_NODE in cn2) sleep 60;; esac; echo ok\n",
    );
    let j = format!("jobs/{id}");
    // The down and drained nodes fail at once, while the others still run. (The timeout leaves
    // `echo ok` seconds to run on a loaded machine: a CI run's took over 2 s, and another CI
    // run took 8-15 s to end ten runs of `sleep 2`.)
    assert!(eventually(Duration::from_secs(15), || c.read(&format!("{j}/summary")).contains("DOWN: cn9, SUM: 1")));
    assert_eq!(c.read(&format!("{j}/nodes/cn1/state")), "failed cn1 is drained: disk swap\n");
    assert_eq!(c.read(&format!("{j}/nodes/cn9/state")), "lost cn9 is down: agent disconnected\n");
    assert_eq!(c.read(&format!("{j}/nodes/cn2/state")), "running on cn2\n");
    assert_eq!(c.read("nodes/cn2/jobs"), format!("{id}\n"));
    assert_eq!(wait(&c, id), "255\n", "{}", c.read(&format!("{j}/state")));
    assert_eq!(
        c.read(&format!("{j}/summary")),
        "PASS: cn[0,3], SUM: 2\nFAILED: cn1, SUM: 1\nTIMEOUT: cn2, SUM: 1\nDOWN: cn9, SUM: 1\n"
    );
    assert_eq!(c.read(&format!("{j}/state")), "failed 255 on cn[1-2,9] (3 of 5 nodes)\n");
}

#[test]
fn multi_node_specs_are_checked_counted_and_killed() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn[0-5]", 200);
    let submit_err = |spec: &str| {
        let r = c.write("jobs/new", spec.as_bytes());
        (r, c.read("jobs/error"))
    };
    let (r, why) = submit_err("#CLUSTER nodes=cn[4-7]\nhostname\n");
    assert_eq!(r, Err(libc::EINVAL));
    assert!(why.contains("cn[6-7] are not nodes of this cluster"), "{why}");
    let (r, why) = submit_err("#CLUSTER nodes=@nosuch\nhostname\n");
    assert_eq!(r, Err(libc::EINVAL));
    assert!(why.contains("nosuch"), "{why}");
    let (r, why) = submit_err("#CLUSTER nodes=cn[0-1] array=1-2\nhostname\n");
    assert_eq!(r, Err(libc::EINVAL));
    assert!(why.contains("cannot be combined"), "{why}");
    let (r, why) = submit_err("#CLUSTER nodes=9\nhostname\n");
    assert_eq!(r, Err(libc::EINVAL));
    assert!(why.contains("this cluster has 6 nodes"), "{why}");
    assert_eq!(c.read("jobs/queue"), "", "refused specs make no job");

    // A group names the nodes; a count lets the head choose them.
    assert_eq!(c.write("groups/rack1", b"cn[1-3]\n"), Ok(()));
    let id = submit_as(&c, "cfalice", "#CLUSTER nodes=@rack1\nhostname >/dev/null; echo $CLUSTER_NODE\n");
    assert_eq!(wait(&c, id), "0\n");
    assert_eq!(c.read(&format!("jobs/{id}/summary")), "PASS: cn[1-3], SUM: 3\n");
    assert_eq!(ls(&c, &format!("jobs/{id}/nodes")), ["cn1", "cn2", "cn3"]);
    let id = submit_as(&c, "cfalice", "#CLUSTER nodes=4\necho same\n");
    assert_eq!(wait(&c, id), "0\n");
    let summary = c.read(&format!("jobs/{id}/summary"));
    assert!(summary.ends_with(", SUM: 4\n") && summary.starts_with("PASS: cn"), "{summary}");
    assert_eq!(ls(&c, &format!("jobs/{id}/nodes")).len(), 4);
    // A one-node job has a summary and output too.
    let id = submit_as(&c, "cfalice", "echo solo\n");
    assert_eq!(wait(&c, id), "0\n");
    let node = c.read(&format!("jobs/{id}/nodes")).trim().to_string();
    assert_eq!(c.read(&format!("jobs/{id}/summary")), format!("PASS: {node}, SUM: 1\n"));
    assert_eq!(c.read(&format!("jobs/{id}/output")), format!("---------------\n{node} (1)\n---------------\nsolo\n"));
    assert_eq!(c.write(&format!("jobs/{id}/ctl"), b"retry-failed\n"), Err(libc::EINVAL));

    // kill stops every node's run.
    let id = submit_as(&c, "cfalice", "#CLUSTER nodes=cn[0-5]\nsleep 60\n");
    let j = format!("jobs/{id}");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/cn5/jobs") == format!("{id}\n")));
    assert_eq!(c.write(&format!("{j}/ctl"), b"retry-failed\n"), Err(libc::EBUSY));
    assert_eq!(c.write(&format!("{j}/ctl"), b"kill\n"), Ok(()));
    assert_killed(&wait(&c, id));
    assert_eq!(c.read(&format!("{j}/state")), "killed by root\n");
    assert_eq!(c.read(&format!("{j}/summary")), "PASS: , SUM: 0\nFAILED: cn[0-5], SUM: 6\n");
    // A kill the moment a job is placed reaches runs whose process is still being started.
    for _ in 0..3 {
        let id = submit_as(&c, "cfalice", "#CLUSTER nodes=cn[0-5]\nsleep 60\n");
        let j = format!("jobs/{id}");
        assert_running(&c, id);
        assert_eq!(c.write(&format!("{j}/ctl"), b"kill\n"), Ok(()));
        assert_killed(&wait(&c, id));
        assert_eq!(c.read(&format!("{j}/summary")), "PASS: , SUM: 0\nFAILED: cn[0-5], SUM: 6\n");
    }
}

#[test]
fn a_multi_node_job_survives_a_head_crash_and_runs_once_per_node() {
    if !crate::can_mount() {
        return;
    }
    users();
    let mut c = Cluster::up("cn[0-9]", 200);
    let d = marks(&c);
    // Each node writes half its line, then waits for the gate.
    let gate = Gate::new(&d, "gate");
    let spec = format!(
        "#CLUSTER nodes=cn[0-9]\nprintf half-; {}\necho $CLUSTER_NODE >> {}/ran\necho done\n",
        gate.wait(),
        d.display()
    );
    let id = submit_as(&c, "cfalice", &spec);
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/cn9/jobs") == format!("{id}\n")));
    // Each node's line is half written when the head crashes, and ends while it is down.
    let halves = || (0..10).all(|n| c.read(&format!("jobs/{id}/nodes/cn{n}/stdout")) == "half-");
    assert!(eventually(Duration::from_secs(10), halves));
    c.crash_head();
    gate.open();
    c.start_head();
    let exit = wait(&c, id);
    let states: Vec<String> =
        (0..10).map(|n| format!("cn{n}: {}", c.read(&format!("jobs/{id}/nodes/cn{n}/state")).trim())).collect();
    assert_eq!(exit, "0\n", "{}\n{}\n{}", c.read(&format!("jobs/{id}/state")), states.join("\n"), c.log());
    assert_eq!(c.read(&format!("jobs/{id}/summary")), "PASS: cn[0-9], SUM: 10\n");
    let mut ran: Vec<String> = std::fs::read_to_string(d.join("ran")).unwrap().lines().map(String::from).collect();
    ran.sort();
    let mut want: Vec<String> = (0..10).map(|n| format!("cn{n}")).collect();
    want.sort();
    assert_eq!(ran, want, "each node ran it exactly once");
    assert_eq!(c.read(&format!("jobs/{id}/nodes/cn3/stdout")), "half-done\n");
    // The job's stdout has each line whole, its first half from before the crash.
    let mut lines: Vec<String> = c.read(&format!("jobs/{id}/stdout")).lines().map(String::from).collect();
    lines.sort();
    let mut want: Vec<String> = (0..10).map(|n| format!("cn{n}: half-done")).collect();
    want.sort();
    assert_eq!(lines, want);
    // As for any job, a head whose spool lost them says so rather than show the job silent.
    std::fs::remove_dir_all(c.state.join("spool").join(id.to_string())).unwrap();
    let stdout = std::fs::read(c.path(&format!("jobs/{id}/stdout")));
    assert_eq!(stdout.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));
    let why = c.read(&format!("jobs/{id}/error"));
    assert!(why.contains("150 bytes were spooled"), "{why}");
}

#[test]
fn after_a_head_restart_a_multi_node_job_waits_for_nodes_not_heard_from_yet() {
    if !crate::can_mount() {
        return;
    }
    users();
    let mut c = Cluster::up("cn[0-1]", 200);
    let ext = c.agent("ext1");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn[0-1],ext1\n"));
    c.kill_agent(ext);
    c.crash_head();
    c.start_head();
    // ext1 has not reported since the head started: it may be redialling, so it is awaited.
    let id = submit_as(&c, "cfalice", "#CLUSTER nodes=cn0,ext1\necho ok\n");
    let waiting = "queued waiting for ext1 to report after the head started\n";
    assert!(eventually(Duration::from_secs(15), || c.read(&format!("jobs/{id}/state")) == waiting));
    let ext = c.agent("ext1");
    assert_eq!(wait(&c, id), "0\n", "{}", c.read(&format!("jobs/{id}/state")));
    assert_eq!(c.read(&format!("jobs/{id}/summary")), "PASS: cn0,ext1, SUM: 2\n");

    // A node that does not come back within the grace is down: the job runs without it.
    c.kill_agent(ext);
    c.crash_head();
    c.start_head();
    let id = submit_as(&c, "cfalice", "#CLUSTER nodes=cn0,ext1\necho ok\n");
    assert_eq!(wait(&c, id), "255\n", "{}", c.read(&format!("jobs/{id}/state")));
    assert_eq!(c.read(&format!("jobs/{id}/summary")), "PASS: cn0, SUM: 1\nDOWN: ext1, SUM: 1\n");
    assert_eq!(c.read(&format!("jobs/{id}/nodes/ext1/state")), "lost ext1 is down: no report since the head started\n");
}
