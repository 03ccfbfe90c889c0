//! Fuzzes what `hsm/queue` takes: any line parses or errs, never panics, and a parsed request
//! prints as an `active_requests` line that parses back to the same request.
#![no_main]

use clusterfs::hsm::{Line, parse_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for line in text.split('\n') {
        if let Ok(Line::Request(r)) = parse_line(line) {
            let again = parse_line(&r.to_line()).expect("a printed request parses");
            assert_eq!(again, Line::Request(clusterfs::hsm::Request { uid: None, ..r }));
        }
    }
});
