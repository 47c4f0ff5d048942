//! Secrets presented by callers: the admin token's Bearer check, shared by
//! the instances' `/admin` routes and the `confab up` supervisor, and a
//! comparison that tells an attacker nothing through its timing.

use crate::error::ApiError;
use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};

/// The `Authorization: Bearer` value, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// 401 unless the request carries `expected` as its Bearer token; when no
/// token is configured, the admin API is off and every call is refused.
pub fn check_admin(headers: &HeaderMap, expected: Option<&str>) -> Result<(), ApiError> {
    let Some(expected) = expected else {
        return Err(ApiError::unauthorized(
            "the admin API is off: no admin token is configured",
        ));
    };
    let given = bearer(headers)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <admin token>"))?;
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("wrong admin token"))
    }
}

/// Equality whose time depends on neither the contents nor the lengths:
/// both sides are hashed to 32 bytes first, then compared without an
/// early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_only_when_equal() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret-longer"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn admin_check_needs_the_configured_token() {
        let mut headers = HeaderMap::new();
        assert_eq!(check_admin(&headers, Some("t")).unwrap_err().status, 401);
        headers.insert(header::AUTHORIZATION, "Bearer t".parse().unwrap());
        assert!(check_admin(&headers, Some("t")).is_ok());
        assert_eq!(check_admin(&headers, Some("u")).unwrap_err().status, 401);
        assert_eq!(check_admin(&headers, None).unwrap_err().status, 401);
    }
}
