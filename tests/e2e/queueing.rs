//! Queueing and lifecycle: array jobs and their limit, priorities, lost jobs, retention.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::harness::{Cluster, Gate, eventually, sh, sh_as};
use crate::jobs::{assert_running, submit_as, users, wait};

fn errno_of_read(c: &Cluster, rel: &str) -> Option<i32> {
    std::fs::read(c.path(rel)).err().and_then(|e| e.raw_os_error())
}

/// (start, end) seconds of each task, written by the tasks themselves.
fn intervals(dir: &std::path::Path, n: u32) -> Vec<(f64, f64)> {
    (1..=n)
        .map(|i| {
            let read = |ext: &str| -> f64 {
                let f = dir.join(format!("{i}.{ext}"));
                std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display())).trim().parse().unwrap()
            };
            (read("start"), read("end"))
        })
        .collect()
}

#[test]
fn array_tasks_run_every_index_within_their_limit() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn[0-1]", 200);
    let marks = c.dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    std::fs::set_permissions(&marks, std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = marks.display();
    let spec = format!(
        "#CLUSTER array=1-8%2 name=sweep\ndate +%s.%N > {d}/$CLUSTER_ARRAY_INDEX.start\nsleep 0.3\n\
         echo task $CLUSTER_ARRAY_INDEX of $CLUSTER_JOB_ID\ndate +%s.%N > {d}/$CLUSTER_ARRAY_INDEX.end\n"
    );
    let id = submit_as(&c, "cfalice", &spec);
    let mut tasks: Vec<u32> = std::fs::read_dir(c.path(&format!("jobs/{id}/tasks")))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    tasks.sort_unstable();
    assert_eq!(tasks, (1..=8).collect::<Vec<_>>());
    // Tasks are not jobs of their own in jobs/.
    let top: Vec<String> =
        std::fs::read_dir(c.path("jobs")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert!(top.contains(&id.to_string()) && !top.contains(&(id + 1).to_string()), "{top:?}");
    assert_eq!(errno_of_read(&c, &format!("jobs/{}/state", id + 1)), Some(libc::ENOENT));

    assert_eq!(wait(&c, id), "0\n", "{}", c.read(&format!("jobs/{id}/state")));
    assert_eq!(c.read(&format!("jobs/{id}/state")), "done 0\n");
    for n in 1..=8 {
        let t = format!("jobs/{id}/tasks/{n}");
        assert_eq!(c.read(&format!("{t}/stdout")), format!("task {n} of {id}\n"));
        assert_eq!(c.read(&format!("{t}/state")), "done 0\n");
        assert_eq!(c.read(&format!("{t}/wait")), "0\n");
        assert!(["cn0\n", "cn1\n"].contains(&c.read(&format!("{t}/nodes")).as_str()));
    }
    // The array job's own stdout: every task's lines, prefixed with its index.
    let mut lines: Vec<String> = c.read(&format!("jobs/{id}/stdout")).lines().map(String::from).collect();
    lines.sort();
    let mut want: Vec<String> = (1..=8).map(|n| format!("{n}: task {n} of {id}")).collect();
    want.sort();
    assert_eq!(lines, want);
    // At most 2 at once, and the limit was used: 2 ran together.
    let iv = intervals(&marks, 8);
    let most = iv.iter().map(|(s, _)| iv.iter().filter(|(a, b)| a <= s && s < b).count()).max().unwrap();
    assert_eq!(most, 2, "tasks at once: {iv:?}");
    // In index order, at most 2 at once: when a task starts, every task before it has been
    // started and all but one of them have ended. (Marks, not launches: a task's shell may
    // reach its first line late on a busy machine, but never before its launch.)
    for j in 1..8 {
        let ended = iv[..j].iter().filter(|(_, end)| *end <= iv[j].0).count();
        assert!(ended + 1 >= j, "task {} started with {ended} of the {j} before it ended: {iv:?}", j + 1);
    }

    // Tasks are the owner's: another user reads state but not output.
    let (rc, _, err) = sh_as("cfbob", &format!("cat {}", c.path(&format!("jobs/{id}/tasks/3/stdout")).display()));
    assert_ne!(rc, 0);
    assert!(err.contains("Permission denied"), "{err}");
    let (rc, out, _) = sh_as("cfbob", &format!("cat {}", c.path(&format!("jobs/{id}/tasks/3/state")).display()));
    assert_eq!((rc, out.as_str()), (0, "done 0\n"));
    assert_eq!(c.write(&format!("jobs/{id}/tasks/9/ctl"), b"kill\n"), Err(libc::ENOENT));

    // One failing task fails the job, with its status, naming it; the others still ran.
    let id = submit_as(&c, "root", "#CLUSTER array=0-3\n[ $CLUSTER_ARRAY_INDEX = 2 ] && exit 5\necho ok\n");
    assert_eq!(wait(&c, id), "5\n");
    assert_eq!(c.read(&format!("jobs/{id}/state")), "failed 5 tasks 2 of 4 did not succeed\n");
    assert_eq!(c.read(&format!("jobs/{id}/tasks/3/stdout")), "ok\n");
    assert_eq!(c.read(&format!("jobs/{id}/tasks/2/state")), "failed 5\n");

    // Killing one task leaves the others; killing the job stops the running ones and starts no more.
    let id = submit_as(&c, "root", "#CLUSTER array=1-5%2\nsleep 30\n");
    let t1 = format!("jobs/{id}/tasks/1/state");
    assert!(eventually(Duration::from_secs(10), || c.read(&t1).starts_with("running on cn")), "{}", c.read(&t1));
    let t5 = c.read(&format!("jobs/{id}/tasks/5/state"));
    assert_eq!(t5, "queued waiting for its turn (tasks start in index order, at most 2 at once)\n");
    let killed = c.write(&format!("jobs/{id}/tasks/1/ctl"), b"kill\n");
    assert_eq!(killed, Ok(()), "{}", c.read(&format!("jobs/{id}/tasks/1/error")));
    crate::jobs::assert_killed(&c.read(&format!("jobs/{id}/tasks/1/wait")));
    c.write(&format!("jobs/{id}/tasks/5/ctl"), b"kill\n").unwrap();
    assert_eq!(c.read(&format!("jobs/{id}/tasks/5/state")), "killed by root before it started\n");
    let t3 = format!("jobs/{id}/tasks/3/state");
    assert!(eventually(Duration::from_secs(10), || c.read(&t3).starts_with("running")), "{}", c.read(&t3));
    assert!(c.read("jobs/queue").contains(&format!("{id} root running cn")), "{}", c.read("jobs/queue"));
    let killed = c.write(&format!("jobs/{id}/ctl"), b"kill\n");
    assert_eq!(killed, Ok(()), "{}", c.read(&format!("jobs/{id}/error")));
    let w = wait(&c, id);
    assert_eq!(c.read(&format!("jobs/{id}/state")), "killed by root (3 of 5 tasks started)\n", "{w}");
    assert_eq!(c.read(&format!("jobs/{id}/tasks/4/state")), "killed by root before it started\n");
    assert_eq!(c.read(&format!("jobs/{id}/tasks/3/state")), "killed by root\n");
    // Tasks go with their job.
    let (rc, _, err) = sh(&format!("rmdir {}", c.path(&format!("jobs/{id}/tasks/3")).display()));
    assert!(rc != 0 && err.contains("Operation not permitted"), "{err}");
    std::fs::remove_dir(c.path(&format!("jobs/{id}"))).unwrap();
    assert_eq!(errno_of_read(&c, &format!("jobs/{id}/tasks/3/state")), Some(libc::ENOENT));
    assert!(!c.state.join("spool").join((id + 3).to_string()).exists());

    // A kill while short tasks come and go answers success, whatever ended in between, and
    // the thousands of tasks go with their job in one removal.
    for _ in 0..3 {
        let id = submit_as(&c, "root", "#CLUSTER array=1-100000%4 isolate=none\ntrue\n");
        assert!(eventually(Duration::from_secs(20), || c.read(&format!("jobs/{id}/state")).contains(" ended")));
        let killed = c.write(&format!("jobs/{id}/ctl"), b"kill\n");
        assert_eq!(killed, Ok(()), "{}", c.read(&format!("jobs/{id}/error")));
        wait(&c, id);
        let state = c.read(&format!("jobs/{id}/state"));
        assert!(state.starts_with("killed by root ("), "{state}");
        std::fs::remove_dir(c.path(&format!("jobs/{id}"))).unwrap();
        assert_eq!(errno_of_read(&c, &format!("jobs/{id}/state")), Some(libc::ENOENT));
    }
}

#[test]
fn higher_priority_starts_first_and_only_root_raises_it() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn0", 200);
    let gate = Gate::new(c.dir.path(), "gate");
    let order = c.dir.path().join("order");
    let cpus: u32 = c.read("nodes/cn0/sitrep").lines().find_map(|l| l.strip_prefix("cpus ")).unwrap().parse().unwrap();
    // A job holding every cpu of the only node, until the gate opens.
    let blocker = submit_as(&c, "root", &format!("#CLUSTER cpus={cpus}\n{}\n", gate.wait()));
    assert_running(&c, blocker);
    let mut ids = Vec::new();
    for (name, prio) in [("low", -5), ("mid", 0), ("high", 10), ("mid2", 0)] {
        let spec = format!("#CLUSTER cpus={cpus} priority={prio}\necho {name} >> {}\n", order.display());
        ids.push(submit_as(&c, "root", &spec));
    }
    let state = c.read(&format!("jobs/{}/state", ids[0]));
    let busy = format!("queued waiting for a node with {cpus} free cpus\n");
    assert_eq!(state, busy);
    // Every waiting job says so when the only node is drained, and again when it is back;
    // the order holds through both.
    let all_say = |want: &str| {
        eventually(Duration::from_secs(5), || ids.iter().all(|id| c.read(&format!("jobs/{id}/state")) == want))
    };
    c.write("nodes/cn0/ctl", b"drain\n").unwrap();
    assert!(all_say("queued waiting for a node to be up\n"), "{}", c.read("jobs/queue"));
    c.write("nodes/cn0/ctl", b"resume\n").unwrap();
    assert!(all_say(&busy), "{}", c.read("jobs/queue"));
    gate.open();
    for id in &ids {
        assert_eq!(wait(&c, *id), "0\n");
    }
    assert_eq!(std::fs::read_to_string(&order).unwrap(), "high\nmid\nmid2\nlow\n");

    // Users may lower their priority, not raise it.
    let new = c.path("jobs/new");
    let (rc, _, err) = sh_as("cfalice", &format!("printf '#CLUSTER priority=1\\ntrue\\n' > {}", new.display()));
    assert!(rc != 0 && err.contains("Operation not permitted"), "{err}");
    let (_, msg, _) = sh_as("cfalice", &format!("cat {}", c.path("jobs/error").display()));
    assert!(msg.contains("only root may set a priority above 0"), "{msg}");
    let id = submit_as(&c, "cfalice", "#CLUSTER priority=-1\ntrue\n");
    assert_eq!(wait(&c, id), "0\n");
}

#[test]
fn jobs_are_lost_with_their_node_and_forgotten_after_retention() {
    if !crate::can_mount() {
        return;
    }
    let mut c = Cluster::up_with("cn0", 200, "[jobs]\nlost_after_s = 1\nretention_s = 3\n");
    // Only the extra node takes jobs.
    c.write("nodes/cn0/ctl", b"drain\n").unwrap();
    let agent = c.agent("ext1");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "ext1\n"), "{}", c.read("nodes/up"));
    let id = submit_as(&c, "root", "sleep 60\n");
    assert_running(&c, id);
    assert_eq!(c.read(&format!("jobs/{id}/state")).trim_end(), "running on ext1");
    assert!(eventually(Duration::from_secs(15), || c.read("nodes/ext1/jobs") == format!("{id}\n")));
    // The run's directory names it uniquely on this machine (tests run side by side).
    let run = c.dir.path().join(format!("agents/ext1/runs/{id}")).display().to_string();
    let shim_up = eventually(Duration::from_secs(10), || sh(&format!("pgrep -f 'shim {run}$'")).0 == 0);
    assert!(shim_up, "the run never started on ext1");
    // The node goes down and stays down: after lost_after_s its job is lost, with the reason.
    c.kill_agent(agent);
    let w = wait(&c, id);
    assert!(w.starts_with("lost node ext1 down for"), "{w}");
    assert!(c.read(&format!("jobs/{id}/state")).starts_with("lost node ext1 down for"));
    // When the agent comes back, the run it still has is ended, not resumed.
    assert!(sh(&format!("pgrep -f 'shim {run}$'")).0 == 0, "the run outlived its agent: {:?}", sh("pgrep -fa shim"));
    c.agent("ext1");
    assert!(
        eventually(Duration::from_secs(10), || sh(&format!("pgrep -f 'shim {run}$'")).0 != 0),
        "a lost run was left going"
    );

    // Ended jobs go after the retention, with their output.
    let done = submit_as(&c, "root", "echo bye\n");
    assert_eq!(wait(&c, done), "0\n");
    assert!(c.state.join("spool").join(done.to_string()).exists());
    let gone =
        eventually(Duration::from_secs(10), || errno_of_read(&c, &format!("jobs/{done}/state")) == Some(libc::ENOENT));
    assert!(gone, "job {done} still there after its retention");
    assert!(!c.state.join("spool").join(done.to_string()).exists());
    assert!(!c.read("jobs/queue").contains(&format!("{done} ")));
}

#[test]
fn an_agent_back_without_its_runs_has_them_marked_lost() {
    if !crate::can_mount() {
        return;
    }
    let mut c = Cluster::up("cn0", 200);
    c.write("nodes/cn0/ctl", b"drain\n").unwrap();
    let agent = c.agent("ext2");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "ext2\n"));
    let id = submit_as(&c, "root", "sleep 60\n");
    assert_running(&c, id);
    let run = c.dir.path().join(format!("agents/ext2/runs/{id}")).display().to_string();
    let shim_up = eventually(Duration::from_secs(10), || sh(&format!("pgrep -f 'shim {run}$'")).0 == 0);
    assert!(shim_up, "the run never started on ext2");
    std::thread::sleep(Duration::from_millis(300));
    // The node is reinstalled: its agent and runs are gone, and it comes back empty.
    c.kill_agent(agent);
    let _ = sh(&format!("pkill -9 -f 'shim {run}$'"));
    std::fs::remove_dir_all(c.dir.path().join("agents").join("ext2")).unwrap();
    c.agent("ext2");
    let w = wait(&c, id);
    assert_eq!(w, "lost the agent on ext2 no longer knows it\n");
}

#[test]
fn a_cluster_can_forbid_root_jobs() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up_with("cn0", 200, "[jobs]\nallow_root = false\n");
    let before = c.read("jobs/queue");
    assert_eq!(c.write("jobs/new", b"id -u\n"), Err(libc::EPERM));
    assert!(c.read("jobs/error").contains("root jobs are forbidden"), "{}", c.read("jobs/error"));
    assert_eq!(c.read("jobs/queue"), before, "nothing was submitted");
    let id = submit_as(&c, "cfalice", "id -un\n");
    assert_eq!(wait(&c, id), "0\n");
    assert_eq!(c.read(&format!("jobs/{id}/stdout")), "cfalice\n");
}
