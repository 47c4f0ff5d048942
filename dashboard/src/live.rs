//! The browser side of `/live`: an `EventSource` whose every message is a
//! whole [`ClusterView`]. The browser reconnects by itself after an error;
//! the page says "reconnecting…" meanwhile.

use crate::model::ClusterView;
use leptos::prelude::*;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::JsCast;

pub fn follow(live: RwSignal<Option<ClusterView>>, connected: RwSignal<bool>) {
    let Ok(source) = web_sys::EventSource::new("/live") else {
        connected.set(false);
        return;
    };
    let on_message =
        Closure::<dyn FnMut(web_sys::MessageEvent)>::new(move |event: web_sys::MessageEvent| {
            let Some(text) = event.data().as_string() else {
                return;
            };
            if let Ok(view) = serde_json::from_str::<ClusterView>(&text) {
                connected.set(true);
                live.set(Some(view));
            }
        });
    let on_error = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| connected.set(false));
    source.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    source.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    // Both live as long as the page.
    on_message.forget();
    on_error.forget();
    std::mem::forget(source);
}
