//! TLS for every confab listener and for the calls between components
//! (gateway → instance over HTTP and the channel, dashboard → instances,
//! gateways and supervisor, supervisor → its children).
//!
//! rustls with the `ring` provider, chosen explicitly rather than through a
//! process-wide default so that no crate's feature flags can change which
//! one is used. Listeners take a PEM certificate chain and a PEM key
//! (`http.tls-cert-file`, `http.tls-key-file`); clients trust the CA
//! certificates of `http.tls-ca-file`, or the system's roots when it is
//! empty. Plain `http://` URLs keep working beside `https://` ones: what a
//! client speaks follows the URL it was given.

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A listener's certificate chain and key.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading http.tls-cert-file {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| {
            format!(
                "http.tls-cert-file {}: not PEM certificates",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!(
            "http.tls-cert-file {}: no certificate in the file",
            cert.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("http.tls-key-file {}: no PEM private key", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("http.tls-cert-file and http.tls-key-file do not make a usable pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a client trusts: the CA file's certificates, or the system's roots.
pub fn client_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(ca) => {
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("reading http.tls-ca-file {}", ca.display()))?
            {
                let cert = cert.with_context(|| {
                    format!("http.tls-ca-file {}: not PEM certificates", ca.display())
                })?;
                roots
                    .add(cert)
                    .with_context(|| format!("http.tls-ca-file {}", ca.display()))?;
            }
            if roots.is_empty() {
                anyhow::bail!(
                    "http.tls-ca-file {}: no certificate in the file",
                    ca.display()
                );
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Make ring the process's default rustls provider, for HTTP clients built
/// without this module (`reqwest::Client::new()` finds no provider
/// otherwise: confab builds reqwest without one of its own).
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// What this process trusts when it calls another component: set once at
/// start-up from `[http]` ([`install_client`]); the system's roots until then.
static CLIENT: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();

/// Trust `http.tls-ca-file` (or the system's roots) for every call this
/// process makes. The first call wins; later ones (tests building several
/// applications in one process) keep it.
pub fn install_client(http: &crate::config::HttpConfig) -> anyhow::Result<()> {
    let config = client_config(http.tls_ca_file.as_deref())?;
    let _ = CLIENT.set(config);
    Ok(())
}

fn client() -> Arc<rustls::ClientConfig> {
    install_default_provider();
    CLIENT
        .get_or_init(|| {
            client_config(None).unwrap_or_else(|_| {
                Arc::new(
                    rustls::ClientConfig::builder_with_provider(provider())
                        .with_safe_default_protocol_versions()
                        .expect("ring supports the default protocol versions")
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth(),
                )
            })
        })
        .clone()
}

/// A `reqwest` client builder that speaks TLS as this process trusts.
pub fn reqwest_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().tls_backend_preconfigured((*client()).clone())
}

/// hyper's connector with TLS for `https://` URLs and plain TCP for
/// `http://` ones.
pub fn https_connector(
    http: hyper_util::client::legacy::connect::HttpConnector,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*client()).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// The WebSocket URL of `path` on the component at `base`
/// (`http://` → `ws://`, `https://` → `wss://`).
pub fn websocket_url(base: &str, path: &str) -> String {
    let base = base.trim_end_matches('/');
    let ws = match base.split_once("://") {
        Some(("https", rest)) => format!("wss://{rest}"),
        Some(("http", rest)) => format!("ws://{rest}"),
        _ => base.to_owned(),
    };
    format!("{ws}{path}")
}

/// Open a WebSocket (`ws://` or `wss://`), trusting as this process does.
pub async fn websocket(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
    config: Option<tokio_tungstenite::tungstenite::protocol::WebSocketConfig>,
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    tokio_tungstenite::connect_async_tls_with_config(
        request,
        config,
        true,
        Some(tokio_tungstenite::Connector::Rustls(client())),
    )
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn websocket_urls_follow_the_scheme() {
        use super::websocket_url;
        assert_eq!(websocket_url("http://a:1", "/x"), "ws://a:1/x");
        assert_eq!(websocket_url("https://a:1/", "/x"), "wss://a:1/x");
    }
}
