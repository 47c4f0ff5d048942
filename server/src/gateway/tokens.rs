//! Participant tokens: `base64url(v1:chat:participant:role).base64url(hmac)`,
//! signed with the gateways' shared secret. A token is valid for its own
//! chat only, cannot be forged without the secret, and needs no storage:
//! any gateway with the same secret accepts it, and a restarted gateway
//! loses nothing.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub chat_id: String,
    pub participant_id: String,
    pub role: crate::session::Role,
}

#[derive(Clone)]
pub struct TokenKey {
    secret: Vec<u8>,
}

impl TokenKey {
    pub fn new(secret: &[u8]) -> Self {
        TokenKey {
            secret: secret.to_vec(),
        }
    }

    /// A random key, for a single gateway without a configured secret.
    pub fn random() -> Self {
        let bytes: Vec<u8> = (0..2)
            .flat_map(|_| *uuid::Uuid::new_v4().as_bytes())
            .collect();
        TokenKey::new(&bytes)
    }

    fn mac(&self, payload: &[u8]) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(&self.secret).expect("HMAC takes keys of any length");
        mac.update(payload);
        mac
    }

    pub fn issue(&self, claims: &Claims) -> String {
        let payload = format!(
            "v1:{}:{}:{}",
            claims.chat_id,
            claims.participant_id,
            claims.role.as_str()
        );
        let sig = self.mac(payload.as_bytes()).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    /// The claims of a genuine token, or None.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let (payload_b64, sig_b64) = token.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload_b64).ok()?;
        let sig = URL_SAFE_NO_PAD.decode(sig_b64).ok()?;
        self.mac(&payload).verify_slice(&sig).ok()?;
        let text = String::from_utf8(payload).ok()?;
        let mut parts = text.split(':');
        if parts.next()? != "v1" {
            return None;
        }
        let chat_id = parts.next()?.to_owned();
        let participant_id = parts.next()?.to_owned();
        let role = crate::session::Role::parse(parts.next()?)?;
        if parts.next().is_some() {
            return None;
        }
        Some(Claims {
            chat_id,
            participant_id,
            role,
        })
    }
}

/// The WebSocket subprotocol that carries a participant token, so that the
/// token need not travel in the URL (where proxies log it): a browser opens
/// `new WebSocket(url, ["confab.token." + token])`.
pub const WS_TOKEN_PROTOCOL: &str = "confab.token.";

/// The token offered as a subprotocol (`Sec-WebSocket-Protocol`), if any.
pub fn from_ws_protocol(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(WS_TOKEN_PROTOCOL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Role;

    fn claims() -> Claims {
        Claims {
            chat_id: "chat1".into(),
            participant_id: "p1".into(),
            role: Role::Customer,
        }
    }

    #[test]
    fn a_token_verifies_with_its_key_only() {
        let key = TokenKey::new(b"secret");
        let token = key.issue(&claims());
        assert_eq!(key.verify(&token), Some(claims()));
        assert_eq!(TokenKey::new(b"other").verify(&token), None);
        assert_eq!(TokenKey::random().verify(&token), None);
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let key = TokenKey::new(b"secret");
        let token = key.issue(&claims());
        let (_, sig) = token.split_once('.').unwrap();
        let forged = format!("{}.{sig}", URL_SAFE_NO_PAD.encode("v1:chat2:p1:customer"));
        assert_eq!(key.verify(&forged), None);
        assert_eq!(key.verify("garbage"), None);
        assert_eq!(key.verify(""), None);
        assert_eq!(key.verify(&format!("{token}x")), None);
    }
}
