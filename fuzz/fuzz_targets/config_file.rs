//! `--config` files: any TOML (or not) gives a Config that validates, or a clear error.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use stallwatch::config::Flags;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("stallwatch-fuzz-{}.toml", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(data))
        .expect("writing the config");
    let flags = Flags {
        config: Some(path),
        ..Flags::default()
    };
    if let Ok(c) = flags.resolve() {
        c.validate().expect("a resolved config validates");
        let _ = c.to_toml();
    }
});
