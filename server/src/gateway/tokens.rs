//! Participant tokens:
//! `base64url(v2:chat:participant:role:expires:agent).base64url(hmac)`,
//! signed with the gateways' shared secret. A token is valid for its own
//! chat only and until it expires (`gateway.token-ttl`; an active client
//! trades it for a fresh one at `POST /api/v1/chats/{id}/token`), cannot be
//! forged without the secret, and needs no storage: any gateway with the
//! same secret accepts it, and a restarted gateway loses nothing. An agent's
//! token names the agent, so that revoking the agent (crate::gateway::agents)
//! ends their tokens too.
//!
//! `v1` tokens (no expiry; gateways before 0.2) are still accepted, so
//! that chats live across a rolling upgrade keep their tokens; rotate
//! `gateway.token-secret` once every gateway is upgraded to end them.

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
    /// Unix seconds after which the token is refused; None: a v1 token.
    pub expires_at: Option<u64>,
    /// The agent an agent's token was issued to.
    pub agent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a token this key signed (or not a token at all).
    Invalid,
    Expired,
}

#[derive(Clone)]
pub struct TokenKey {
    secret: Vec<u8>,
}

/// Now, in Unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
        let payload = match claims.expires_at {
            Some(expires) => format!(
                "v2:{}:{}:{}:{expires}:{}",
                claims.chat_id,
                claims.participant_id,
                claims.role.as_str(),
                claims.agent.as_deref().unwrap_or("")
            ),
            None => format!(
                "v1:{}:{}:{}",
                claims.chat_id,
                claims.participant_id,
                claims.role.as_str()
            ),
        };
        let sig = self.mac(payload.as_bytes()).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    /// The claims of a genuine token that has not expired at `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, Refused> {
        let claims = self.genuine(token).ok_or(Refused::Invalid)?;
        match claims.expires_at {
            Some(expires) if expires <= now => Err(Refused::Expired),
            _ => Ok(claims),
        }
    }

    fn genuine(&self, token: &str) -> Option<Claims> {
        let (payload_b64, sig_b64) = token.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload_b64).ok()?;
        let sig = URL_SAFE_NO_PAD.decode(sig_b64).ok()?;
        self.mac(&payload).verify_slice(&sig).ok()?;
        let text = String::from_utf8(payload).ok()?;
        let mut parts = text.split(':');
        let version = parts.next()?;
        let chat_id = parts.next()?.to_owned();
        let participant_id = parts.next()?.to_owned();
        let role = crate::session::Role::parse(parts.next()?)?;
        let (expires_at, agent) = match version {
            "v1" => (None, None),
            "v2" => {
                let expires = parts.next()?.parse::<u64>().ok()?;
                let agent = parts.next()?;
                (Some(expires), (!agent.is_empty()).then(|| agent.to_owned()))
            }
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Claims {
            chat_id,
            participant_id,
            role,
            expires_at,
            agent,
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
            role: Role::Agent,
            expires_at: Some(1_000),
            agent: Some("ann".into()),
        }
    }

    #[test]
    fn a_token_verifies_with_its_key_only_until_it_expires() {
        let key = TokenKey::new(b"secret");
        let token = key.issue(&claims());
        assert_eq!(key.verify(&token, 999), Ok(claims()));
        assert_eq!(key.verify(&token, 1_000), Err(Refused::Expired));
        assert_eq!(
            TokenKey::new(b"other").verify(&token, 0),
            Err(Refused::Invalid)
        );
        assert_eq!(TokenKey::random().verify(&token, 0), Err(Refused::Invalid));
        let customer = Claims {
            role: Role::Customer,
            agent: None,
            ..claims()
        };
        assert_eq!(key.verify(&key.issue(&customer), 0), Ok(customer));
    }

    #[test]
    fn tokens_of_earlier_gateways_still_verify() {
        let key = TokenKey::new(b"secret");
        let v1 = Claims {
            role: Role::Customer,
            expires_at: None,
            agent: None,
            ..claims()
        };
        let token = key.issue(&v1);
        assert!(URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap()
            .starts_with(b"v1:"));
        assert_eq!(key.verify(&token, u64::MAX), Ok(v1));
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let key = TokenKey::new(b"secret");
        let token = key.issue(&claims());
        let (_, sig) = token.split_once('.').unwrap();
        for payload in [
            "v2:chat2:p1:agent:1000:ann",
            "v2:chat1:p1:agent:99999:ann",
            "v2:chat1:p1:agent:1000:",
        ] {
            let forged = format!("{}.{sig}", URL_SAFE_NO_PAD.encode(payload));
            assert_eq!(key.verify(&forged, 0), Err(Refused::Invalid), "{payload}");
        }
        assert_eq!(key.verify("garbage", 0), Err(Refused::Invalid));
        assert_eq!(key.verify("", 0), Err(Refused::Invalid));
        assert_eq!(key.verify(&format!("{token}x"), 0), Err(Refused::Invalid));
    }
}
