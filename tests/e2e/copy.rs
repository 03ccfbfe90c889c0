//! Copy jobs: a head-side file sent down a relay tree of agents, checked, with its metadata.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use clusterfs::nodeset::NodeSet;

use crate::harness::{Cluster, Gate, eventually, sh, sh_as};
use crate::jobs::{submit_as, users, wait};

const MIB: u64 = 1 << 20;

/// The xxh3-128 of a file's content (not the copy's own checksum: an independent check).
fn sum_of(path: &Path) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut sum = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return format!("{:032x}", sum.digest128());
        }
        sum.update(&buf[..n]);
    }
}

/// A file of `mib` MiB of random bytes owned by `user`, mode 0640, with an old mtime.
fn source(c: &Cluster, user: &str, mib: u64) -> std::path::PathBuf {
    let src = c.dir.path().join("src.bin");
    let (code, _, err) = sh(&format!(
        "head -c {mib}M /dev/urandom > {s} && chown {user}: {s} && chmod 0640 {s} && touch -d '2001-02-03 04:05:06.789' {s}",
        s = src.display()
    ));
    assert_eq!(code, 0, "{err}");
    src
}

/// A directory `user` may fill.
fn dest_root(c: &Cluster, user: &str) -> std::path::PathBuf {
    let d = c.dir.path().join("dest");
    std::fs::create_dir_all(&d).unwrap();
    let (code, _, err) = sh(&format!("chown {user}: {}", d.display()));
    assert_eq!(code, 0, "{err}");
    std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// Bytes of `node` in a copy job's `progress`.
fn progress_of(text: &str, node: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (set, bytes) = l.split_once(' ')?;
        NodeSet::parse(set).ok()?.contains(node).then(|| bytes.split('/').next()?.parse().ok()).flatten()
    })
}

/// A copy job submitted by alice: a fresh `mib` MiB file of hers to `nodes`, at
/// `<dest root>/<dest>`.
struct CopyJob {
    id: u64,
    /// `jobs/<id>`.
    j: String,
    src: std::path::PathBuf,
    root: std::path::PathBuf,
}

fn copy_job(c: &Cluster, nodes: &str, mib: u64, dest: &str, fanout: u32) -> CopyJob {
    let src = source(c, "cfalice", mib);
    let root = dest_root(c, "cfalice");
    let spec =
        format!("#CLUSTER nodes={nodes} copy={} dest={}/{dest} fanout={fanout}\n", src.display(), root.display());
    let id = submit_as(c, "cfalice", &spec);
    CopyJob { id, j: format!("jobs/{id}"), src, root }
}

/// Waits until `node` of copy job `j` has more than 0 and less than `below` bytes.
fn await_under_way(c: &Cluster, j: &str, node: &str, below: u64) {
    let seen = eventually(Duration::from_secs(60), || {
        progress_of(&c.read(&format!("{j}/progress")), node).is_some_and(|b| b > 0 && b < below)
    });
    assert!(seen, "{node}'s copy was never seen under way: {}", c.read(&format!("{j}/progress")));
}

/// The names in a directory of the host.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    v.sort();
    v
}

#[test]
fn a_file_lands_byte_identical_on_20_nodes_with_its_metadata() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn[0-19]", 200);
    let CopyJob { id, j, src, root } = copy_job(&c, "cn[0-19]", 200, "%n/sub/big.bin", 3);
    assert_eq!(wait(&c, id), "0\n", "{}: {}", c.read(&format!("{j}/summary")), c.read(&format!("{j}/nodes/cn0/state")));
    assert_eq!(c.read(&format!("{j}/summary")), "PASS: cn[0-19], SUM: 20\n");
    assert_eq!(c.read(&format!("{j}/progress")), format!("cn[0-19] {0}/{0}\n", 200 * MIB));
    let src_meta = std::fs::metadata(&src).unwrap();
    let want = sum_of(&src);
    for n in 0..20 {
        let dir = root.join(format!("cn{n}")).join("sub");
        let f = dir.join("big.bin");
        let m = std::fs::metadata(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert_eq!(m.len(), 200 * MIB);
        assert_eq!(m.mode() & 0o7777, 0o640, "{}", f.display());
        assert_eq!((m.uid(), m.gid()), (src_meta.uid(), src_meta.gid()), "{}", f.display());
        assert_eq!((m.mtime(), m.mtime_nsec()), (src_meta.mtime(), src_meta.mtime_nsec()), "{}", f.display());
        // Parents were made as the user; no temporary file is left.
        assert_eq!(std::fs::metadata(&dir).unwrap().uid(), src_meta.uid());
        assert_eq!(names_in(&dir), ["big.bin"]);
        assert_eq!(sum_of(&f), want, "{} differs", f.display());
    }
}

#[test]
fn copies_are_checked_and_run_as_the_user() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn[0-1]", 200);
    let src = source(&c, "cfalice", 1);
    let root = dest_root(&c, "cfalice");
    let s = src.display();
    // A spec refused whole at the first write gets an errno and a sentence; one found broken
    // when complete fails its job with the reason.
    let (code, _, _) = sh_as(
        "cfalice",
        &format!("printf '#CLUSTER nodes=cn[0-1] copy=/no/such dest=/x\\n' > {}", c.path("jobs/new").display()),
    );
    assert_ne!(code, 0);
    let error_of = |user: &str| sh_as(user, &format!("cat {}", c.path("jobs/error").display())).1;
    assert!(error_of("cfalice").contains("/no/such: No such file"), "{}", error_of("cfalice"));
    for (spec, why) in [
        (format!("#CLUSTER nodes=cn[0-1] copy={s}\n"), "copy needs dest="),
        (format!("#CLUSTER nodes=cn[0-1] copy={s} dest=/x\necho hi\n"), "runs no script"),
        (format!("#CLUSTER copy={s} dest=/x\n"), "copy needs nodes="),
    ] {
        let id = submit_as(&c, "cfalice", &spec);
        wait(&c, id);
        let state = c.read(&format!("jobs/{id}/state"));
        assert!(state.starts_with("failed spec: ") && state.contains(why), "{spec}: {state}");
    }
    // Another user may not read alice's file, and may not write where alice's copy goes.
    let (code, _, err) = sh_as(
        "cfbob",
        &format!("printf '#CLUSTER nodes=cn[0-1] copy={s} dest=/tmp/x\\n' > {}", c.path("jobs/new").display()),
    );
    assert_ne!(code, 0);
    assert!(err.contains("Permission denied"), "{err}");
    assert!(error_of("cfbob").contains("cfbob may not read it"), "{}", error_of("cfbob"));
    let bob_src = c.dir.path().join("bob.bin");
    sh(&format!("echo bob > {b}; chown cfbob: {b}", b = bob_src.display()));
    let id = submit_as(
        &c,
        "cfbob",
        &format!("#CLUSTER nodes=cn[0-1] copy={} dest={}/%n.bin\n", bob_src.display(), root.display()),
    );
    assert_eq!(wait(&c, id), "1\n");
    assert_eq!(c.read(&format!("jobs/{id}/summary")), "PASS: , SUM: 0\nFAILED: cn[0-1], SUM: 2\n");
    let state = c.read(&format!("jobs/{id}/nodes/cn0/state"));
    assert!(state.contains("copy failed") && state.contains("Permission denied"), "{state}");
    assert!(!root.join("cn0.bin").exists());

    // Alice's file in a group she is not in (root's): the copies are hers, in her own group,
    // without the set-group-id bit meant for root's group, as `cp -p` leaves them.
    let odd = c.dir.path().join("odd.bin");
    sh(&format!("echo odd > {o}; chown cfalice:root {o}; chmod 2750 {o}", o = odd.display()));
    let id = submit_as(
        &c,
        "cfalice",
        &format!("#CLUSTER nodes=cn[0-1] copy={} dest={}/odd-%n.bin\n", odd.display(), root.display()),
    );
    assert_eq!(wait(&c, id), "0\n", "{}", c.read(&format!("jobs/{id}/nodes/cn0/state")));
    let alice = std::fs::metadata(&src).unwrap();
    for n in ["cn0", "cn1"] {
        let m = std::fs::metadata(root.join(format!("odd-{n}.bin"))).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (alice.uid(), alice.gid(), 0o750), "{n}");
    }

    // The source is checked again on the file opened when the copy starts: alice's link, turned
    // toward a file only root may read while her copy waited, sends nothing.
    let links = c.dir.path().join("links");
    let secret = c.dir.path().join("secret.bin");
    let (code, _, err) = sh(&format!(
        "mkdir {l} && chown cfalice: {l} && echo root-only > {x} && chmod 600 {x} && ln -s {s} {l}/src && chown -h cfalice: {l}/src",
        l = links.display(),
        x = secret.display(),
    ));
    assert_eq!(code, 0, "{err}");
    // Alice's copy of `links/src`, queued behind a job that waits for a gate, with the link
    // turned toward `target` while it waits: the copy's state on cn0 once it ended.
    let turned = |target: &Path, dest: &str| {
        let gate = Gate::new(c.dir.path(), &format!("gate-{dest}"));
        let first = submit_as(&c, "cfalice", &format!("#CLUSTER nodes=cn0\n{}\n", gate.wait()));
        let spec = format!(
            "#CLUSTER nodes=cn[0-1] after={first} copy={}/src dest={}/{dest}\n",
            links.display(),
            root.display()
        );
        let id = submit_as(&c, "cfalice", &spec);
        let (code, _, err) = sh_as("cfalice", &format!("ln -sfn {} {}/src", target.display(), links.display()));
        assert_eq!(code, 0, "{err}");
        let before = c.read(&format!("jobs/{id}/state"));
        assert!(before.starts_with("queued"), "the copy started before the link was turned: {before}");
        gate.open();
        assert_eq!(wait(&c, first), "0\n");
        assert_ne!(wait(&c, id), "0\n");
        c.read(&format!("jobs/{id}/nodes/cn0/state"))
    };
    let state = turned(&secret, "late-%n.bin");
    assert!(
        state.contains("EACCES") && state.contains("cfalice may not read it (checked again when the copy started)"),
        "{state}"
    );
    assert!(!root.join("late-cn0.bin").exists() && !root.join("late-cn1.bin").exists());
    // Turned toward a FIFO of hers: refused, not a head waiting forever in open(2).
    let (code, _, err) = sh_as("cfalice", &format!("mkfifo {l}/fifo && ln -sfn {s} {l}/src", l = links.display()));
    assert_eq!(code, 0, "{err}");
    let state = turned(&links.join("fifo"), "fifo-%n.bin");
    assert!(state.contains("not a regular file (checked again when the copy started)"), "{state}");
}

#[test]
fn a_relay_killed_mid_copy_is_routed_around_and_named() {
    if !crate::can_mount() {
        return;
    }
    users();
    let mut c = Cluster::up("cn[0-1]", 200);
    let mut relays = Vec::new();
    for n in 1..=5 {
        relays.push(c.agent(&format!("cr{n}")));
    }
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn[0-1],cr[1-5]\n"));
    // fanout=1: a chain cn0 -> cn1 -> cr1 -> cr2 -> cr3 -> cr4 -> cr5.
    let CopyJob { id, j, src, root } = copy_job(&c, "cn[0-1],cr[1-5]", 300, "%n.bin", 1);
    let size = 300 * MIB;
    await_under_way(&c, &j, "cr2", u64::MAX);
    c.kill_agent(relays[1]);
    let p = c.read(&format!("{j}/progress"));
    assert!(progress_of(&p, "cr2").is_some_and(|b| b < size), "cr2 was done before it was killed: {p}");
    assert_eq!(wait(&c, id), "255\n", "{}", c.read(&format!("{j}/summary")));
    assert_eq!(c.read(&format!("{j}/summary")), "PASS: cn[0-1],cr[1,3-5], SUM: 6\nDOWN: cr2, SUM: 1\n");
    let state = c.read(&format!("{j}/nodes/cr2/state"));
    assert!(state.starts_with("lost dropped out of the copy tree"), "{state}");
    let want = sum_of(&src);
    for node in ["cn0", "cn1", "cr1", "cr3", "cr4", "cr5"] {
        assert_eq!(sum_of(&root.join(format!("{node}.bin"))), want, "{node}");
    }
    assert!(!root.join("cr2.bin").exists(), "a failed copy leaves no file");
}

#[test]
fn a_copy_survives_a_head_crash() {
    if !crate::can_mount() {
        return;
    }
    users();
    let mut c = Cluster::up("cn0", 200);
    // Agents of their own: `clusterfs up`'s local agent ends with its head.
    for n in 1..=3 {
        c.agent(&format!("cr{n}"));
    }
    assert!(eventually(Duration::from_secs(10), || c.read("nodes/up") == "cn0,cr[1-3]\n"));
    let CopyJob { id, j, src, root } = copy_job(&c, "cr[1-3]", 300, "%n.bin", 1);
    let size = 300 * MIB;
    await_under_way(&c, &j, "cr1", size);
    c.crash_head();
    c.start_head();
    assert_eq!(wait(&c, id), "0\n", "{}", c.read(&format!("{j}/summary")));
    assert_eq!(c.read(&format!("{j}/summary")), "PASS: cr[1-3], SUM: 3\n");
    let want = sum_of(&src);
    for node in ["cr1", "cr2", "cr3"] {
        assert_eq!(sum_of(&root.join(format!("{node}.bin"))), want, "{node}");
    }
}

#[test]
fn a_killed_copy_leaves_no_file() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn[0-3]", 200);
    let CopyJob { id, j, root, .. } = copy_job(&c, "cn[0-3]", 300, "%n.bin", 1);
    await_under_way(&c, &j, "cn3", 300 * MIB);
    let (code, _, err) = sh_as("cfalice", &format!("echo kill > {}/ctl", c.path(&j).display()));
    assert_eq!(code, 0, "{err}");
    wait(&c, id);
    assert_eq!(c.read(&format!("{j}/state")), "killed by cfalice\n");
    let state = c.read(&format!("{j}/nodes/cn3/state"));
    assert_eq!(state, "killed by cfalice\n");
    let left = names_in(&root);
    assert!(left.iter().all(|n| !n.starts_with(".cn3.bin.")), "a temporary file was left: {left:?}");
}

#[test]
fn a_source_changed_mid_copy_fails_its_checksum_and_leaves_no_file() {
    if !crate::can_mount() {
        return;
    }
    users();
    let c = Cluster::up("cn[0-2]", 200);
    let CopyJob { id, j, src, root } = copy_job(&c, "cn[0-2]", 300, "%n.bin", 1);
    await_under_way(&c, &j, "cn0", 200 * MIB);
    // The last MiB changes after its checksum was taken and before it is sent.
    let (code, _, err) =
        sh(&format!("dd if=/dev/zero of={} bs=1M seek=299 count=1 conv=notrunc status=none", src.display()));
    assert_eq!(code, 0, "{err}");
    assert_eq!(wait(&c, id), "1\n", "{}", c.read(&format!("{j}/summary")));
    assert_eq!(c.read(&format!("{j}/summary")), "PASS: , SUM: 0\nFAILED: cn[0-2], SUM: 3\n");
    let state = c.read(&format!("{j}/nodes/cn2/state"));
    assert!(state.contains("checksum does not match"), "{state}");
    let left = names_in(&root);
    assert!(left.is_empty(), "a failed copy left files: {left:?}");
}
