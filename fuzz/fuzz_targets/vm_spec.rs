//! Fuzzes what `vms/new` and `vms/templates/<name>` take: any text parses or errs, never
//! panics, and what parses is within the limits.
#![no_main]

use clusterfs::vms::{MAX_CPUS, MAX_MEM, MIN_MEM, parse_spec, parse_template};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(s) = parse_spec(text) {
        assert!(clusterfs::names::check("VM", &s.name).is_ok());
        assert!(s.mem.is_none_or(|m| (MIN_MEM..=MAX_MEM).contains(&m.0)));
        assert!(s.cpus.is_none_or(|c| (1..=MAX_CPUS).contains(&c)));
    }
    if let Ok(t) = parse_template(text) {
        assert!(t.disk.is_absolute());
        assert!(t.format == "qcow2" || t.format == "raw");
    }
});
