//! Fuzzes the TOML configuration: any text loads or errs, never panics.
#![no_main]

use clusterfs::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::from_toml(text);
    }
});
