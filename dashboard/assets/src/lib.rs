//! The dashboard's browser half (WASM, its JS glue and the stylesheet),
//! built by `build.rs` and embedded in the binary, so that a dashboard
//! serves nothing from the disk.

/// One file under `/pkg/`, raw and gzipped.
pub struct Asset {
    pub path: &'static str,
    pub raw: &'static [u8],
    pub gzip: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// The file served at `/pkg/<path>`.
pub fn find(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// Its media type, from the extension.
pub fn mime(path: &str) -> &'static str {
    match path.rsplit('.').next() {
        Some("wasm") => "application/wasm",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_browser_half_is_built_and_small() {
        assert!(BUILT, "built with CONFAB_SKIP_WASM: no browser half");
        let wasm = find("confab_dashboard_bg.wasm").expect("the WASM is embedded");
        let js = find("confab_dashboard.js").expect("the JS glue is embedded");
        assert!(
            find("dashboard.css").is_some(),
            "the stylesheet is embedded"
        );
        assert_eq!(&wasm.raw[..4], b"\0asm");
        assert!(!js.raw.is_empty());
        // The budget: 1 MiB uncompressed.
        assert!(
            wasm.raw.len() <= 1 << 20,
            "the WASM is {} bytes, over 1 MiB",
            wasm.raw.len()
        );
        assert!(wasm.gzip.len() < wasm.raw.len());
    }
}
