//! Fuzzes the nodeset parser: any text parses or errs, never panics; what parses folds and reparses equal.
#![no_main]

use clusterfs::nodeset::NodeSet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let groups = |name: &str| (name == "g").then(|| "cn[1-3],x[01-02]y1".to_string());
    if let Ok(set) = NodeSet::parse_with(text, &groups, 10_000) {
        let folded = set.fold();
        let again = NodeSet::parse_with(&folded, &groups, 10_000).expect("a folded set reparses");
        assert_eq!(again, set, "{text:?} folded to {folded:?}");
    }
});
