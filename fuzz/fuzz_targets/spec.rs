//! Fuzzes the job spec parser: any bytes parse or err, never panic; a whole valid spec is a valid prefix too.
#![no_main]

use clusterfs::jobs::Spec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if Spec::parse(data).is_ok() {
        assert!(Spec::parse_prefix(data, false).is_ok(), "a valid spec is a valid prefix of itself");
    }
    let _ = Spec::parse_prefix(data, true);
});
