//! What the benchmark programs share: finding the binaries and the test guest.
// Each benchmark uses a subset.
#![allow(dead_code)]

use std::path::PathBuf;

/// `--ferry` if given, else the `ferry` binary next to this program.
pub fn ferry_binary(given: &Option<PathBuf>) -> Result<PathBuf, String> {
    match given {
        Some(p) => Ok(p.clone()),
        None => Ok(std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("ferry")),
    }
}

/// `--guest` if given, else `$FERRY_GUEST`.
pub fn guest_image(given: &Option<PathBuf>) -> Result<PathBuf, String> {
    given
        .clone()
        .or_else(|| std::env::var_os("FERRY_GUEST").map(PathBuf::from))
        .ok_or_else(|| {
            "no guest: pass --guest or set FERRY_GUEST (scripts/build-guest.sh prints it)"
                .to_owned()
        })
}
