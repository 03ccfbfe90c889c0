//! `clusterfs nodeset` against ClusterShell's `cluset` on the same inputs.

use std::process::Command;

use crate::harness::bin;

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ours(args: &[&str]) -> (bool, String) {
    let mut a = vec!["nodeset", "--root", "/nonexistent"];
    a.extend_from_slice(args);
    run(bin("clusterfs").to_str().unwrap(), &a)
}

fn have_cluset() -> bool {
    if Command::new("cluset").arg("--version").output().is_ok() {
        return true;
    }
    assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI=true but cluset is missing");
    eprintln!("skipping: cluset (Debian clustershell) is not installed");
    false
}

#[test]
fn fold_expand_count_match_cluset() {
    if !have_cluset() {
        return;
    }
    let cases = [
        "cn1,cn2,cn3,cn5",
        "cn[001-010]",
        "cn[001-010],cn011",
        "cn09,cn10,cn11",
        "cn9,cn10",
        "b1,a2,a1,c",
        "login,cn[1-3]",
        "cn[1-10]!cn5",
        "cn[1-10]&cn[5-20]",
        "cn[1-5]^cn[4-8]",
        "cn[1-2]-ib[0-1]",
        "rack[1-2]-node[01-04]",
        "cn[1-10/3]",
        "cn1[0-2]",
        "cn[0-3,5-9]",
        "x1y2,x1y3,x2y2",
        "cn[5,3,1],cn[2-4]",
    ];
    for case in cases {
        for flag in ["-f", "-e", "-c"] {
            let theirs = run("cluset", &[flag, case]);
            let mine = ours(&[flag, case]);
            assert_eq!(mine, theirs, "cluset {flag} {case}");
        }
    }
    // Several arguments are united.
    assert_eq!(ours(&["-f", "cn1", "cn2"]), run("cluset", &["-f", "cn1", "cn2"]));
    // -x, -i and -X join what the arguments before them made, in command-line order.
    let operations: [&[&str]; 6] = [
        &["-f", "cn[1-10]", "-x", "cn5"],
        &["-e", "cn[1-10]", "-i", "cn[5-20]"],
        &["-f", "cn[1-5]", "--xor", "cn[4-8]"],
        &["-f", "cn[1-5]", "-x", "cn3", "cn3"],
        &["-c", "cn[1-10]", "-x", "cn[2-3]", "-i", "cn[1-4]"],
        &["-f", "cn[1-10]", "--intersection", "cn[2-9]", "--exclude", "cn[4-5]", "-X", "cn[8-12]"],
    ];
    for args in operations {
        let mine = ours(args);
        assert!(mine.0, "{args:?}");
        assert_eq!(mine, run("cluset", args), "cluset {args:?}");
    }
}

#[test]
fn random_sets_fold_like_cluset() {
    if !have_cluset() {
        return;
    }
    // A deterministic pseudo-random walk over sets with gaps and padding.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    for _ in 0..40 {
        let n = 1 + next(12);
        let pad = next(3) as usize;
        let names: Vec<String> = (0..n).map(|_| format!("n{:0pad$}", next(40), pad = pad + 1)).collect();
        let arg = names.join(",");
        assert_eq!(ours(&["-f", &arg]), run("cluset", &["-f", &arg]), "{arg}");
    }
}

#[test]
fn bombs_and_bad_syntax_fail_cleanly() {
    let (ok, _) = ours(&["-c", "n[0-99999999999]"]);
    assert!(!ok, "a nodeset bomb is refused");
    let (ok, _) = ours(&["-c", "n[0-99999]"]);
    assert!(ok, "100,000 names are within the default limit");
    let (ok, _) = ours(&["-f", "cn["]);
    assert!(!ok);
    // A mistake is one line on stderr, even where RUST_BACKTRACE is set.
    let out = Command::new(bin("clusterfs"))
        .args(["nodeset", "--root", "/nonexistent", "-f", "cn[3-1]"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err, "clusterfs: cn[3-1]: nodeset syntax: range '3-1' goes backwards\n");
}
