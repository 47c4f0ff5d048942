//! confab's operator dashboard, laid out as Leptos' own examples are: one
//! crate, compiled twice. With `ssr` (inside the `confab` binary) it
//! renders pages and runs the `#[server]` functions; with `hydrate` (WASM,
//! built by `dashboard/assets`) it makes the page live in the browser.
//!
//! The server half does not talk to the cluster itself: it asks a
//! [`ssr::Backend`], which `confab-server` implements over its typed
//! internal contract, so this crate needs none of the server's code.

// Leptos views are deeply nested types.
#![recursion_limit = "256"]

pub mod app;
pub mod model;

#[cfg(feature = "hydrate")]
mod live;
#[cfg(feature = "ssr")]
pub mod ssr;

/// The name of the WASM and its JS glue under `/pkg/`.
pub const OUTPUT_NAME: &str = "confab_dashboard";

/// The browser's entry point: the loader that `HydrationScripts` emits
/// calls it by this name.
#[cfg(feature = "hydrate")]
#[wasm_bindgen::prelude::wasm_bindgen]
pub fn hydrate() {
    console_error_panic_hook::set_once();
    leptos::mount::hydrate_body(app::App);
}
