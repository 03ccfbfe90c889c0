//! Fuzzes what `images/new` and `resize` take: any text parses or errs, never panics, and a
//! parsed size is within the image limits.
#![no_main]

use clusterfs::images::{MAX_SIZE, MIN_SIZE, parse_image_size, parse_new};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(new) = parse_new(text) {
        assert!(!new.user.is_empty());
        assert!(new.size.is_none_or(|s| (MIN_SIZE..=MAX_SIZE).contains(&s)));
    }
    if let Ok(size) = parse_image_size(text) {
        assert!((MIN_SIZE..=MAX_SIZE).contains(&size));
    }
});
