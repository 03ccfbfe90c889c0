//! jobs/: submit as the calling user, watch, wait, kill, remove; durable across a head crash.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use crate::harness::{Cluster, Gate, eventually, sh, sh_as, slack};

/// Two real users for identity and permission checks (made once per test run).
pub fn users() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = Command::new("groupadd").arg("cfteam").status();
        for u in ["cfalice", "cfbob"] {
            if !Command::new("id").arg(u).output().is_ok_and(|o| o.status.success()) {
                let ok = Command::new("useradd").args(["-m", "-s", "/bin/bash", u]).status().unwrap().success();
                assert!(ok, "useradd {u}");
            }
            assert!(Command::new("usermod").args(["-aG", "cfteam", u]).status().unwrap().success(), "usermod {u}");
        }
    });
}

/// Submits `spec` as `user` the way a script without binaries does; returns the id.
pub fn submit_as(c: &Cluster, user: &str, spec: &str) -> u64 {
    let new = c.path("jobs/new");
    let script = format!("exec 3<>{}; printf '%s' \"$SPEC\" >&3; read id <&3; echo $id", new.display());
    let out =
        Command::new("runuser").args(["-u", user, "--", "bash", "-c", &script]).env("SPEC", spec).output().unwrap();
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    id.parse().unwrap_or_else(|_| panic!("no id for {spec:?}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// Waits (bounded) until job `id` is running.
pub fn assert_running(c: &Cluster, id: u64) {
    let state = || c.read(&format!("jobs/{id}/state"));
    assert!(eventually(Duration::from_secs(10), || state().starts_with("running")), "job {id}: {}", state());
}

pub fn wait(c: &Cluster, id: u64) -> String {
    c.read(&format!("jobs/{id}/wait"))
}

/// The exit status of a job ended by `kill`: SIGTERM's (143), or SIGKILL's a second later (137)
/// when the SIGTERM came before the job's shell had started its command: in its own PID
/// namespace (the default isolation) that shell is the namespace's init, which the kernel lets
/// ignore a SIGTERM it has no handler for.
pub fn assert_killed(status: &str) {
    assert!(status == "143\n" || status == "137\n", "not ended by kill: {status:?}");
}

#[test]
fn a_job_runs_as_the_user_who_wrote_it() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn[0-1]", 200);
    let id = submit_as(
        &c,
        "cfalice",
        "id -u; id -G; echo \"$USER $HOME $CLUSTER_JOB_ID $CLUSTER_NODE\"; pwd; echo oops >&2\n",
    );
    assert_eq!(wait(&c, id), "0\n");
    let out = c.read(&format!("jobs/{id}/stdout"));
    let lines: Vec<&str> = out.lines().collect();
    let uid = String::from_utf8(Command::new("id").args(["-u", "cfalice"]).output().unwrap().stdout).unwrap();
    let team = String::from_utf8(Command::new("getent").args(["group", "cfteam"]).output().unwrap().stdout).unwrap();
    let team_gid = team.split(':').nth(2).unwrap();
    assert_eq!(lines[0], uid.trim(), "the job's uid is the submitter's");
    assert!(lines[1].split(' ').any(|g| g == team_gid), "supplementary groups kept: {}", lines[1]);
    let node = c.read(&format!("jobs/{id}/nodes"));
    assert_eq!(lines[2], format!("cfalice /home/cfalice {id} {}", node.trim()));
    assert_eq!(lines[3], "/home/cfalice");
    assert_eq!(c.read(&format!("jobs/{id}/stderr")), "oops\n");
    assert_eq!(c.read(&format!("jobs/{id}/state")), "done 0\n");
    assert_eq!(c.read(&format!("jobs/{id}/exit")), "0\n");
    // A script with its own interpreter (`#!`) is run by it, as the user.
    let id = submit_as(&c, "cfalice", "#!/usr/bin/python3\nimport os\nprint('python', os.getuid())\n");
    assert_eq!(wait(&c, id), "0\n", "{}", c.read(&format!("jobs/{id}/stderr")));
    assert_eq!(c.read(&format!("jobs/{id}/stdout")), format!("python {}\n", uid.trim()));
    // A directory the user may not enter is refused as the user, with why.
    let id = submit_as(&c, "cfalice", "#CLUSTER cwd=/root\npwd\n");
    assert_eq!(wait(&c, id), "127\n");
    assert_eq!(
        c.read(&format!("jobs/{id}/state")),
        "failed 127 failed to start: starting the job: Permission denied (os error 13)\n"
    );
    // Root's jobs run as root.
    let id = submit_as(&c, "root", "id -u\n");
    assert_eq!(wait(&c, id), "0\n");
    assert_eq!(c.read(&format!("jobs/{id}/stdout")), "0\n");
}

#[test]
fn other_users_cannot_kill_remove_or_read_output_but_can_see_state() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn0", 200);
    let id = submit_as(&c, "cfalice", "echo secret; sleep 30\n");
    assert_running(&c, id);
    let dir = c.path(&format!("jobs/{id}"));
    for (what, script) in [
        ("read stdout", format!("cat {}/stdout", dir.display())),
        ("read spec", format!("cat {}/spec", dir.display())),
        ("kill", format!("echo kill > {}/ctl", dir.display())),
        ("rmdir", format!("rmdir {}", dir.display())),
    ] {
        let (rc, _, err) = sh_as("cfbob", &script);
        assert_ne!(rc, 0, "bob could {what}");
        assert!(err.contains("Permission denied") || err.contains("Operation not permitted"), "{what}: {err}");
    }
    let (rc, out, _) =
        sh_as("cfbob", &format!("cat {0}/state; ls {0}; cat {1}", dir.display(), c.path("jobs/queue").display()));
    assert_eq!(rc, 0);
    assert!(out.starts_with("running on cn0\n"), "{out}");
    assert!(out.contains(&format!("{id} cfalice running cn0 -")), "{out}");
    assert!(c.read(&format!("jobs/{id}/state")).starts_with("running"), "still running");
    // The owner may.
    let stdout = || sh_as("cfalice", &format!("cat {}/stdout", dir.display()));
    assert!(
        eventually(Duration::from_secs(15), || stdout() == (0, "secret\n".into(), String::new())),
        "{:?}",
        stdout()
    );
    let (rc, _, err) = sh_as("cfalice", &format!("rmdir {}", dir.display()));
    assert_eq!(rc, 0, "{err}");
    assert!(!dir.exists());
}

#[test]
fn stdout_grows_while_the_job_runs() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    let gate = Gate::new(c.dir.path(), "gate");
    let id = submit_as(&c, "root", &format!("echo first; {}; echo second\n", gate.wait()));
    let mut tail = Command::new("tail")
        .args(["-n", "+1", "-s", "0.1", "-f"])
        .arg(c.path(&format!("jobs/{id}/stdout")))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(tail.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "first\n");
    assert!(c.read(&format!("jobs/{id}/state")).starts_with("running"), "seen before the job ended");
    gate.open();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "second\n");
    let _ = tail.kill();
    let _ = tail.wait();
    assert_eq!(wait(&c, id), "0\n");
}

#[test]
fn a_job_inherits_no_descriptor_and_no_ignored_signal_of_whoever_started_the_agent() {
    if !crate::can_mount() {
        return;
    }
    let mut c = Cluster::up("cn0", 200);
    // Started as a shell's background job is: SIGINT and SIGQUIT ignored, and a descriptor open.
    let prefix = ["sh", "-c", "trap '' INT QUIT; exec 7</dev/null; exec \"$0\" \"$@\""].map(String::from);
    let addr = c.addr();
    c.agent_on(&prefix, &addr, &["--name", "cn7"]);
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn[0,7]\n"));
    assert_eq!(c.write("nodes/cn0/ctl", b"drain the job goes to cn7\n"), Ok(()));
    for isolate in ["ns", "none"] {
        let script = format!(
            "#CLUSTER isolate={isolate}\nfor f in /proc/$$/fd/*; do n=${{f##*/}}; [ $n -gt 2 ] && echo $n $(readlink $f); done\n\
             grep SigIgn /proc/$$/status\n"
        );
        let id = submit_as(&c, "root", &script);
        assert_eq!(wait(&c, id), "0\n", "{}", c.read(&format!("jobs/{id}/state")));
        let out = c.read(&format!("jobs/{id}/stdout"));
        let (ignored, fds) = out.lines().partition::<Vec<&str>, _>(|l| l.starts_with("SigIgn"));
        assert_eq!(ignored, ["SigIgn:\t0000000000000000"], "isolate={isolate}: {out}");
        // Past stdio, its script (which the shell opens again to read) and the shell's own.
        assert!(fds.iter().any(|l| l.contains("memfd:clusterfs-script")), "isolate={isolate}: {out}");
        assert!(!fds.iter().any(|l| l.contains("/dev/null")), "the agent's descriptor 7 leaked: {out}");
    }
}

#[test]
fn kill_signal_and_timeout() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn0", 200);
    let id = submit_as(&c, "cfalice", "sleep 60\n");
    assert_running(&c, id);
    let start = Instant::now();
    let (rc, _, err) = sh_as("cfalice", &format!("echo kill > {}", c.path(&format!("jobs/{id}/ctl")).display()));
    assert_eq!(rc, 0, "{err}");
    // By its SIGTERM, not the SIGKILL a second later: the job has it from its first moment.
    assert_eq!(wait(&c, id), "143\n");
    assert!(start.elapsed() < Duration::from_secs(2) * slack(), "killed in {:?}", start.elapsed());
    assert_eq!(c.read(&format!("jobs/{id}/state")), "killed by cfalice\n");

    // The job's shell takes the SIGTERM as well as what it runs (under its namespace's init:
    // as PID 1 it would ignore it, and go on with the script once `sleep` ended).
    let id = submit_as(&c, "root", "echo started; sleep 60; echo went on\n");
    let out = format!("jobs/{id}/stdout");
    assert!(eventually(Duration::from_secs(10), || c.read(&out) == "started\n"), "{}", c.read(&out));
    c.write(&format!("jobs/{id}/ctl"), b"kill\n").unwrap();
    assert_eq!(wait(&c, id), "143\n");
    assert_eq!(c.read(&out), "started\n", "the script went on after SIGTERM");

    // A job that ignores SIGTERM still dies (SIGKILL a second later). Killed once its shell
    // has said so: a kill that came first would end it as any other.
    let id = submit_as(&c, "root", "trap '' TERM; echo ignoring; sleep 60\n");
    let out = format!("jobs/{id}/stdout");
    assert!(eventually(Duration::from_secs(10), || c.read(&out) == "ignoring\n"), "{}", c.read(&out));
    c.write(&format!("jobs/{id}/ctl"), b"kill\n").unwrap();
    let start = Instant::now();
    assert_eq!(wait(&c, id), "137\n");
    assert!(start.elapsed() < Duration::from_secs(10), "killed in {:?}", start.elapsed());

    let id = submit_as(&c, "root", "trap 'echo got usr1; exit 7' USR1; echo trapping; while :; do sleep 0.1; done\n");
    let out = format!("jobs/{id}/stdout");
    assert!(eventually(Duration::from_secs(10), || c.read(&out) == "trapping\n"), "{}", c.read(&out));
    c.write(&format!("jobs/{id}/ctl"), b"signal USR1\n").unwrap();
    assert_eq!(wait(&c, id), "7\n");
    assert_eq!(c.read(&format!("jobs/{id}/stdout")), "trapping\ngot usr1\n");
    assert_eq!(c.read(&format!("jobs/{id}/state")), "failed 7\n");

    let id = submit_as(&c, "root", "#CLUSTER timeout=1\nsleep 30\n");
    let start = Instant::now();
    assert_eq!(wait(&c, id), "143\n");
    assert!(start.elapsed() < Duration::from_secs(15), "timed out in {:?}", start.elapsed());
    assert_eq!(c.read(&format!("jobs/{id}/state")), "timeout after 1 s\n");

    for bad in ["bogus", "signal NOPE", "signal", "kill now", "\n"] {
        assert_eq!(c.write(&format!("jobs/{id}/ctl"), bad.as_bytes()), Err(libc::EINVAL), "{bad:?}");
    }
    assert!(c.read(&format!("jobs/{id}/error")).contains("jobs/<id>/ctl takes"));
}

#[test]
fn after_orders_jobs_and_queued_jobs_say_why() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    let mark = c.dir.path().join("mark");
    let gate = Gate::new(c.dir.path(), "gate");
    let a = submit_as(&c, "root", &format!("{}; echo a > {}\n", gate.wait(), mark.display()));
    let b = submit_as(&c, "root", &format!("#CLUSTER after={a}\ncat {}\n", mark.display()));
    assert_running(&c, a);
    assert!(c.read(&format!("jobs/{b}/state")).starts_with("queued"), "{}", c.read(&format!("jobs/{b}/state")));
    gate.open();
    assert_eq!(wait(&c, b), "0\n");
    assert_eq!(c.read(&format!("jobs/{b}/stdout")), "a\n", "b ran after a");
    // A failed dependency fails the dependent job; afterany runs anyway.
    let f = submit_as(&c, "root", "exit 1\n");
    let d = submit_as(&c, "root", &format!("#CLUSTER after={f}\necho never\n"));
    let any = submit_as(&c, "root", &format!("#CLUSTER afterany={f}\necho anyway\n"));
    assert!(wait(&c, d).starts_with("failed dependency"), "{}", c.read(&format!("jobs/{d}/state")));
    assert_eq!(wait(&c, any), "0\n");
    // No node is that big: the job waits for one that is, saying so.
    let most = c.read("nodes/cn0/sitrep").lines().find_map(|l| l.strip_prefix("cpus ").map(String::from)).unwrap();
    let big = submit_as(&c, "root", "#CLUSTER cpus=999\ntrue\n");
    let said = format!("queued no node has 999 cpus (the most is {most}): waiting for one that has\n");
    assert!(
        eventually(Duration::from_secs(15), || c.read(&format!("jobs/{big}/state")) == said),
        "{}",
        c.read(&format!("jobs/{big}/state"))
    );
    assert!(c.read("jobs/queue").contains(&format!("{big} root queued - -")));
    let err = std::fs::OpenOptions::new().read(true).custom_flags_nonblock().open(c.path(&format!("jobs/{big}/wait")));
    assert_eq!(err.unwrap_err().raw_os_error(), Some(libc::EAGAIN), "O_NONBLOCK wait returns at once");
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::custom_flags(self, libc::O_NONBLOCK)
    }
}

#[test]
fn bad_specs_create_nothing() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    let listed = |c: &Cluster| std::fs::read_dir(c.path("jobs")).unwrap().count();
    let before = listed(&c);
    let cases: Vec<(&str, Vec<u8>, i32, &str)> = vec![
        ("unknown key", b"#CLUSTER colour=red\ntrue\n".to_vec(), libc::EINVAL, "unknown key \"colour\""),
        ("bad cpus", b"#CLUSTER cpus=0\ntrue\n".to_vec(), libc::EINVAL, "cpus="),
        ("bad mem", b"#CLUSTER mem=lots\ntrue\n".to_vec(), libc::EINVAL, "mem="),
        ("bad timeout", b"#CLUSTER timeout=soon\ntrue\n".to_vec(), libc::EINVAL, "timeout="),
        ("bad cwd", b"#CLUSTER cwd=tmp\ntrue\n".to_vec(), libc::EINVAL, "cwd="),
        ("bad isolate", b"#CLUSTER isolate=vm\ntrue\n".to_vec(), libc::EINVAL, "isolate="),
        ("bad after", b"#CLUSTER after=x\ntrue\n".to_vec(), libc::EINVAL, "after="),
        ("unknown dependency", b"#CLUSTER after=99999\ntrue\n".to_vec(), libc::EINVAL, "does not exist"),
        ("bad env", b"#CLUSTER env.1=x\ntrue\n".to_vec(), libc::EINVAL, "env.1"),
        ("blank line", b"\n".to_vec(), libc::EINVAL, "the spec is empty"),
        ("blanks", b"  \t \n".to_vec(), libc::EINVAL, "the spec is empty"),
        ("bad JSON", b"{\"cmd\": ".to_vec(), libc::EINVAL, "JSON"),
        ("JSON unknown key", b"{\"cmd\":\"true\",\"gpu\":1}".to_vec(), libc::EINVAL, "unknown key \"gpu\""),
        ("binary junk", (0u8..=255).cycle().take(5000).collect(), libc::EINVAL, "UTF-8"),
        ("NUL", b"true\0\n".to_vec(), libc::EINVAL, "NUL"),
        ("2 MiB", vec![b'#'; 2 << 20], libc::EFBIG, "at most"),
    ];
    for (what, data, errno, sentence) in cases {
        assert_eq!(c.write("jobs/new", &data), Err(errno), "{what}");
        let err = c.read("jobs/error");
        assert!(err.contains(sentence), "{what}: {err}");
    }
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(listed(&c), before, "no job was created");
    assert_eq!(c.read("jobs/queue"), "");
    // A spec of several writes on one handle is one job.
    let (rc, out, err) = sh(&format!(
        "exec 3<>{0}; printf '#CLUSTER name=multi\\n' >&3; printf 'echo one\\n' >&3; printf 'echo two\\n' >&3; read id <&3; exec 3>&-; cat {1}/$id/wait; cat {1}/$id/stdout",
        c.path("jobs/new").display(),
        c.path("jobs").display()
    ));
    assert_eq!((rc, out.as_str()), (0, "0\none\ntwo\n"), "{err}{}", c.read("jobs/error"));
    // Directives alone, and the writer stops: the job fails and says why.
    let (rc, out, err) =
        sh(&format!("exec 3<>{}; printf '#CLUSTER cpus=1\n' >&3; read id <&3; echo $id", c.path("jobs/new").display()));
    assert_eq!(rc, 0, "{err}");
    let id = out.trim();
    assert!(eventually(Duration::from_secs(15), || c.read(&format!("jobs/{id}/state"))
        == "failed spec: the job has no command\n"));
}

#[test]
fn a_head_crash_loses_no_job_and_runs_none_twice() {
    if !crate::can_mount() {
        return;
    }
    let mut c = Cluster::up("cn[0-1]", 200);
    let ids_file = c.dir.path().join("ids");
    std::fs::write(&ids_file, "").unwrap();
    let mut ids = Vec::new();
    for i in 0..50 {
        let spec = format!("sleep 0.{}; echo $CLUSTER_JOB_ID >> {}\n", i % 10, ids_file.display());
        ids.push(submit_as(&c, "root", &spec));
    }
    // An array job too: each task appends its index.
    let tasks_file = c.dir.path().join("tasks");
    let spec = format!("#CLUSTER array=1-20%4\nsleep 0.2; echo $CLUSTER_ARRAY_INDEX >> {}\n", tasks_file.display());
    let array = submit_as(&c, "root", &spec);
    // A plain `echo > jobs/new` is in the store once the shell's close returns.
    let (rc, _, err) = sh(&format!("echo 'echo last' > {}", c.path("jobs/new").display()));
    assert_eq!(rc, 0, "{err}");
    let last = array + 1 + 20;
    // So is a spec written in pieces, by its last piece.
    let script = format!(
        "exec 3>{}; printf '#CLUSTER name=pieces\\n' >&3; printf 'echo one\\n' >&3; printf 'echo two\\n' >&3; exec 3>&-",
        c.path("jobs/new").display()
    );
    let (rc, _, err) = sh(&script);
    assert_eq!(rc, 0, "{err}");
    let pieces = last + 1;
    c.crash_head();
    c.start_head();
    assert_eq!(wait(&c, last), "0\n");
    assert_eq!(c.read(&format!("jobs/{last}/stdout")), "last\n");
    assert_eq!(wait(&c, pieces), "0\n", "{}", c.read(&format!("jobs/{pieces}/state")));
    assert_eq!(c.read(&format!("jobs/{pieces}/stdout")), "one\ntwo\n");
    assert_eq!(wait(&c, array), "0\n", "{}", c.read(&format!("jobs/{array}/state")));
    let mut seen: Vec<u32> =
        std::fs::read_to_string(&tasks_file).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    seen.sort_unstable();
    assert_eq!(seen, (1..=20).collect::<Vec<_>>(), "every task ran exactly once");
    for id in &ids {
        let w = wait(&c, *id);
        assert_eq!(w, "0\n", "job {id}: {}\n{}", c.read(&format!("jobs/{id}/state")), c.log());
    }
    let mut seen: Vec<u64> = std::fs::read_to_string(&ids_file).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    seen.sort_unstable();
    let mut want = ids.clone();
    want.sort_unstable();
    assert_eq!(seen, want, "every job ran exactly once");
    assert_eq!(c.read("jobs/queue"), "");

    // No id is given twice across restarts: not those an array holds for tasks not started,
    // nor a removed job's.
    let held = submit_as(&c, "root", "#CLUSTER array=1-3 cpus=999\ntrue\n");
    assert_eq!(held, pieces + 1);
    c.crash_head();
    c.start_head();
    let after = submit_as(&c, "root", "true\n");
    assert_eq!(after, held + 4, "the array's tasks hold ids {}-{}", held + 1, held + 3);
    assert_eq!(wait(&c, after), "0\n");
    std::fs::remove_dir(c.path(&format!("jobs/{after}"))).unwrap();
    c.crash_head();
    c.start_head();
    assert_eq!(submit_as(&c, "root", "true\n"), after + 1, "removed job {after}'s id was given again");
}

#[test]
fn jobs_are_isolated_limited_and_can_run_in_their_own_root() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn3", 200);
    // Default isolation: own PID, mount, UTS namespaces; limited to its cpus.
    let id = submit_as(&c, "root", "echo $$; hostname; ls /proc | grep -c '^[0-9]'\n");
    assert_eq!(wait(&c, id), "0\n");
    let out = c.read(&format!("jobs/{id}/stdout"));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "2", "the job is the first child of its own PID namespace's init");
    assert_eq!(lines[1], "cn3", "its hostname is the node's name");
    assert!(lines[2].parse::<u32>().unwrap() < 10, "it sees only its own processes: {}", lines[2]);
    // A plain process: no namespaces, and no cgroup of its own unless it has a memory limit,
    // which is enforced as for any job.
    let id =
        submit_as(&c, "root", "#CLUSTER isolate=none\necho $$; grep -c clusterfs/run- /proc/self/cgroup || true\n");
    assert_eq!(wait(&c, id), "0\n");
    let out = c.read(&format!("jobs/{id}/stdout"));
    assert!(out.ends_with("\n0\n") && !out.starts_with("2\n"), "{out}");
    let id = submit_as(&c, "root", "#CLUSTER isolate=none mem=64M\npython3 -c 'x = bytearray(400 * 1024 * 1024)'\n");
    assert_eq!(wait(&c, id), "137\n");
    assert_eq!(c.read(&format!("jobs/{id}/state")), "failed 137 out of memory (limit 67108864 bytes)\n");

    // A memory limit kills a job that allocates past it, and says so.
    let id = submit_as(&c, "root", "#CLUSTER mem=64M\npython3 -c 'x = bytearray(400 * 1024 * 1024)'\n");
    assert_eq!(wait(&c, id), "137\n");
    assert_eq!(c.read(&format!("jobs/{id}/state")), "failed 137 out of memory (limit 67108864 bytes)\n");
    let id = submit_as(&c, "root", "#CLUSTER mem=512M\npython3 -c 'x = bytearray(100 * 1024 * 1024); print(len(x))'\n");
    assert_eq!(wait(&c, id), "0\n");
    // cpus=2 is a CFS quota of two CPUs.
    let id =
        submit_as(&c, "root", "#CLUSTER cpus=2\ncat /proc/self/cgroup | grep -o 'clusterfs/run-[0-9-]*' | head -1\n");
    assert_eq!(wait(&c, id), "0\n");
    let cg = c.read(&format!("jobs/{id}/stdout"));
    assert!(cg.starts_with(&format!("clusterfs/run-{id}-")), "{cg}");

    // A rootfs job sees only that tree.
    let root = c.dir.path().join("rootfs");
    for d in ["bin", "proc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for tool in ["sh", "ls", "cat", "echo", "grep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).unwrap();
    }
    std::fs::write(root.join("only-here"), "inside\n").unwrap();
    let id = submit_as(&c, "root", &format!("#CLUSTER rootfs={}\nls /; cat /only-here\n", root.display()));
    assert_eq!(wait(&c, id), "0\n", "{}{}", c.read(&format!("jobs/{id}/state")), c.read(&format!("jobs/{id}/stderr")));
    assert_eq!(c.read(&format!("jobs/{id}/stdout")), "bin\nonly-here\nproc\ntmp\ninside\n");
    std::fs::set_permissions(c.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // A user's rootfs job can gain no privilege: set-user-id programs in the tree (which its
    // user may have filled) do nothing, for the job and everything it starts.
    let id =
        submit_as(&c, "cfalice", &format!("#CLUSTER rootfs={}\ngrep NoNewPrivs /proc/self/status\n", root.display()));
    assert_eq!(wait(&c, id), "0\n", "{}{}", c.read(&format!("jobs/{id}/state")), c.read(&format!("jobs/{id}/stderr")));
    assert_eq!(c.read(&format!("jobs/{id}/stdout")), "NoNewPrivs:\t1\n");
    // A tree under a directory its user may not enter is refused (the root is entered as root).
    let vault = c.dir.path().join("vault");
    let (code, _, err) = sh(&format!("mkdir -m 700 {v} && cp -a {r} {v}/", v = vault.display(), r = root.display()));
    assert_eq!(code, 0, "{err}");
    let spec = format!("#CLUSTER rootfs={}/rootfs\ncat /only-here\n", vault.display());
    let id = submit_as(&c, "cfalice", &spec);
    assert_eq!(wait(&c, id), "127\n", "{}", c.read(&format!("jobs/{id}/stdout")));
    let state = c.read(&format!("jobs/{id}/state"));
    assert!(state.contains("cfalice may not enter it (Permission denied"), "{state}");
    let id = submit_as(&c, "root", &spec);
    assert_eq!(wait(&c, id), "0\n", "{}", c.read(&format!("jobs/{id}/state")));
    // A rootfs without a shell: a clear failure, not a hang.
    let empty = c.dir.path().join("empty");
    std::fs::create_dir_all(empty.join("proc")).unwrap();
    let id = submit_as(&c, "root", &format!("#CLUSTER rootfs={}\ntrue\n", empty.display()));
    assert_eq!(wait(&c, id), "127\n");
    assert!(c.read(&format!("jobs/{id}/state")).contains("has no /bin/sh"), "{}", c.read(&format!("jobs/{id}/state")));

    // A working directory the node does not have: a clear failure.
    let id = submit_as(&c, "root", "#CLUSTER cwd=/no/such/dir\ntrue\n");
    assert_eq!(wait(&c, id), "127\n");
    assert_eq!(
        c.read(&format!("jobs/{id}/state")),
        "failed 127 failed to start: cwd /no/such/dir is not a directory on this node\n"
    );

    // Nothing is left behind: the cgroup the cpus=2 job ran in is gone now it has ended.
    let name = cg.trim();
    for ctl in ["memory", "cpu"] {
        let dir = format!("/sys/fs/cgroup/{ctl}/{name}");
        assert!(eventually(Duration::from_secs(10), || !std::path::Path::new(&dir).exists()), "{dir} left behind");
    }
}

#[test]
fn a_spec_file_copied_into_jobs_is_submitted_as_its_writer_and_goes() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn0", 200);
    let spec = c.dir.path().join("s.sh");
    std::fs::write(&spec, "id -un\n").unwrap();
    std::fs::set_permissions(&spec, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    // What `nfs-cp`, which never writes over a file, does: a new name in jobs/.
    let (rc, _, err) = sh_as("cfalice", &format!("cp {} {}", spec.display(), c.path("jobs/mine.sh").display()));
    assert_eq!(rc, 0, "{err}");
    let ids = || -> Vec<u64> {
        std::fs::read_dir(c.path("jobs"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    };
    assert!(eventually(Duration::from_secs(10), || ids().len() == 1), "{:?}", ids());
    let id = ids()[0];
    assert_eq!(wait(&c, id), "0\n");
    assert_eq!(c.read(&format!("jobs/{id}/stdout")), "cfalice\n");
    assert!(eventually(Duration::from_secs(15), || !c.path("jobs/mine.sh").exists()), "the spec file stayed");
    // Names that are the tree's, or not names, are refused.
    for name in ["..", "-rf", "12345", "README", "a b"] {
        let made = std::fs::File::create_new(c.path("jobs").join(name));
        assert!(made.is_err(), "jobs/{name} was made");
    }
    assert_eq!(ids(), vec![id]);
}

#[test]
fn runs_are_forked_by_the_agents_zygote_and_start_by_exec_once_it_is_gone() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    let children = |pid: i32| -> Vec<i32> {
        sh(&format!("pgrep -P {pid} -x clusterfs-agent")).1.lines().filter_map(|l| l.trim().parse().ok()).collect()
    };
    let agent = children(c.head_pid());
    assert_eq!(agent.len(), 1, "one local agent: {agent:?}");
    let zygote = children(agent[0]);
    assert_eq!(zygote.len(), 1, "the agent forks one zygote: {zygote:?}");
    // A run's shim is the zygote's child, shown as `clusterfs-agent --shim DIR`.
    let id = submit_as(&c, "root", "sleep 30\n");
    assert_running(&c, id);
    // The head says running once it has placed the job: the fork follows.
    let shims = || sh(&format!("pgrep -P {} -f -- '--shim .*/{id}$'", zygote[0])).1.lines().count();
    assert!(
        eventually(Duration::from_secs(10), || shims() == 1),
        "no shim of job {id} under the zygote: {}",
        sh("ps -ef").1
    );
    assert_eq!(c.write(&format!("jobs/{id}/ctl"), b"kill\n"), Ok(()));
    assert_killed(&wait(&c, id));
    // Without its zygote the agent starts shims itself; the jobs run all the same.
    crate::harness::signal(zygote[0], libc::SIGKILL);
    assert!(eventually(Duration::from_secs(15), || children(agent[0]).is_empty()), "the zygote stayed");
    let id = submit_as(&c, "root", "echo after\n");
    assert_eq!(wait(&c, id), "0\n");
    assert_eq!(c.read(&format!("jobs/{id}/stdout")), "after\n");
}

#[test]
fn a_run_whose_supervisor_dies_ends_and_says_so() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn0", 200);
    let id = submit_as(&c, "root", "sleep 12\n");
    assert_running(&c, id);
    // This cluster's shim: other tests' clusters have a job {id} too.
    let pattern = format!("--shim {}/.*/{id}$", c.state.display());
    let shim = || sh(&format!("pgrep -f -- '{pattern}'")).1.lines().find_map(|l| l.trim().parse::<i32>().ok());
    assert!(eventually(Duration::from_secs(10), || shim().is_some()), "no shim of job {id}: {}", sh("ps -ef").1);
    crate::harness::signal(shim().unwrap(), libc::SIGKILL);
    // Found at the agent's next report: the run ends with the reason, its exit is 255.
    let state = format!("jobs/{id}/state");
    assert!(
        eventually(Duration::from_secs(10), || c.read(&state) == "failed 255 its supervisor died\n"),
        "{}",
        c.read(&state)
    );
    assert_eq!(wait(&c, id), "255\n");
}

#[test]
fn a_run_past_max_output_is_killed_and_the_head_keeps_only_the_limit() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up_with("cn0", 200, "[jobs]\nmax_output = \"1M\"\n");
    // 3 MB on stdout, then a line on stderr, then it would run on: it is killed instead.
    let id = submit_as(&c, "root", "head -c 3000000 /dev/zero | tr '\\0' x; echo on >&2; sleep 60\n");
    assert_killed(&wait(&c, id));
    assert_eq!(
        c.read(&format!("jobs/{id}/state")),
        "killed by clusterfs: its stdout passed max_output (1M; the rest was dropped)\n"
    );
    let out = std::fs::metadata(c.path(&format!("jobs/{id}/stdout"))).unwrap().len();
    assert_eq!(out, 1 << 20, "the head kept the limit, no more");
    assert!(c.read(&format!("jobs/{id}/stdout")).bytes().all(|b| b == b'x'));
    // Under the limit, nothing changes.
    let small = submit_as(&c, "root", "head -c 1000 /dev/zero | tr '\\0' y\n");
    assert_eq!(wait(&c, small), "0\n");
    assert_eq!(c.read(&format!("jobs/{small}/stdout")), "y".repeat(1000));
}

#[test]
fn a_kill_its_node_is_too_slow_to_answer_is_kept_and_delivered_once_it_answers() {
    if !crate::can_mount() {
        return;
    }
    let mut c = Cluster::up("cn0", 200);
    let slow = c.agent("cn7");
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn[0,7]\n"));
    c.write("nodes/cn0/ctl", b"drain\n").unwrap();
    let id = submit_as(&c, "root", "sleep 60\n");
    assert_running(&c, id);
    assert_eq!(c.read(&format!("jobs/{id}/nodes")), "cn7\n");
    // The agent stalls (a loaded machine): the kill gets no answer within ping_timeout_ms, yet
    // the writer is told it is taken, not ETIMEDOUT.
    crate::harness::signal(c.agent_pid(slow), libc::SIGSTOP);
    assert_eq!(c.write(&format!("jobs/{id}/ctl"), b"kill\n"), Ok(()));
    assert!(c.read(&format!("jobs/{id}/state")).starts_with("running"));
    crate::harness::signal(c.agent_pid(slow), libc::SIGCONT);
    assert_killed(&wait(&c, id));
    assert_eq!(c.read(&format!("jobs/{id}/state")), "killed by root\n");
}
