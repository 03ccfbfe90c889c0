//! groups/: root makes, sets and removes named nodesets; they resolve as @name.

use crate::harness::{Cluster, bin, sh, sh_as};

#[test]
fn root_manages_groups_and_users_cannot() {
    if !crate::can_mount() {
        return;
    }
    let c = Cluster::up("cn[0-3]", 200);
    let (rc, _, err) = sh(&format!("echo 'cn3,cn[0-1]' > {}", c.path("groups/compute").display()));
    assert_eq!(rc, 0, "{err}");
    assert_eq!(c.read("groups/compute"), "cn[0-1,3]\n", "stored folded");
    let out = std::process::Command::new(bin("clusterfs"))
        .args(["nodeset", "-f", "--root"])
        .arg(&c.mnt)
        .args(["@compute!cn1", "cn9"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "cn[0,3,9]\n", "{}", String::from_utf8_lossy(&out.stderr));

    // Bad nodesets: EINVAL, a sentence, the group unchanged.
    for (bad, sentence) in
        [("n[0-99999999999]", "too large"), ("cn[", "without"), ("@nosuch", "unknown group"), ("a/b", "not allowed")]
    {
        assert_eq!(c.write("groups/compute", bad.as_bytes()), Err(libc::EINVAL), "{bad}");
        let err = c.read("groups/error");
        assert!(err.starts_with("EINVAL: ") && err.contains(sentence), "{bad}: {err}");
        assert_eq!(c.read("groups/compute"), "cn[0-1,3]\n");
    }
    // A new group whose first nodeset is bad is not made (the shell's `>` created the name).
    let listed = || std::fs::read_dir(c.path("groups")).unwrap().map(|e| e.unwrap().file_name()).collect::<Vec<_>>();
    let before = listed();
    let (rc, _, _) = sh(&format!("echo 'cn[0-' > {}", c.path("groups/fresh").display()));
    assert_ne!(rc, 0);
    assert!(c.read("groups/error").starts_with("EINVAL: group fresh: "), "{}", c.read("groups/error"));
    assert!(c.try_read("groups/fresh").is_none(), "a refused group was made");
    assert_eq!(listed(), before);
    // Corrected at once, it is made: the refused name left no entry in the kernel's cache, which
    // would have had the retry open a name that is gone (ENOENT).
    let retried = c.path("groups/retried");
    let (rc, _, err) = sh(&format!("echo 'cn[0-' > {f} 2>/dev/null; echo cn2 > {f}", f = retried.display()));
    assert_eq!(rc, 0, "{err}");
    assert_eq!(c.read("groups/retried"), "cn2\n");
    std::fs::remove_file(&retried).unwrap();
    // Bad group names are refused at create.
    for bad in ["README", "-x", "a b"] {
        let (rc, _, _) = sh(&format!("echo cn1 > '{}'", c.path("groups").join(bad).display()));
        assert_ne!(rc, 0, "{bad}");
    }
    // Users read groups but cannot change, make or remove them.
    let (_, out, _) = sh_as("nobody", &format!("cat {}", c.path("groups/compute").display()));
    assert_eq!(out, "cn[0-1,3]\n");
    for script in ["echo cn2 > {d}/compute", "echo cn2 > {d}/mine", "rm -f {d}/compute"] {
        let (rc, _, _) = sh_as("nobody", &script.replace("{d}", &c.path("groups").display().to_string()));
        assert_ne!(rc, 0, "{script}");
    }
    assert_eq!(c.read("groups/compute"), "cn[0-1,3]\n");
    let (rc, _, err) = sh(&format!("rm {}", c.path("groups/compute").display()));
    assert_eq!(rc, 0, "{err}");
    assert!(c.try_read("groups/compute").is_none());
}
