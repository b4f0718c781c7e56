//! The one bearer-token rule of every Vigil HTTP listener and of the broker: a secret is compared in time
//! that does not depend on where, or whether, it differs from the expected one, and a listener with a token
//! configured answers nothing but `401 {"error": {"code": "unauthorized", ...}}` to a request without it.
//!
//! A crate of its own so the collector's router, the healer API and the broker share it without depending
//! on each other. The comparison and the header check need only `http`; the axum router layer
//! ([`require_bearer`]) and the 401 answer are behind the `axum` feature.

use http::{HeaderMap, header};
use sha2::{Digest, Sha256};

/// True when `presented` equals `expected`, compared in constant time.
///
/// Both sides are hashed first, so the comparison always runs over two 32-byte digests: neither the position
/// of the first differing byte nor a length mismatch ends it early. What remains visible is the time to hash
/// each side, which grows with its length in 64-byte blocks: the presented length is the caller's own, and
/// the expected one shows only as a block count.
pub fn same_secret(presented: &[u8], expected: &[u8]) -> bool {
    let a = Sha256::digest(presented);
    let b = Sha256::digest(expected);
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold back into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// True when the request carries `Authorization: Bearer <token>` with this token. The scheme is matched
/// case-insensitively (RFC 9110 §11.1) and the credentials with [`same_secret`].
pub fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, credentials)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && same_secret(credentials.trim().as_bytes(), token.as_bytes())
}

/// The body of the 401 every listener gives, in the API's error shape.
pub const UNAUTHORIZED_BODY: &str = r#"{"error":{"code":"unauthorized","message":"a valid bearer token is required: Authorization: Bearer <token>"}}"#;

/// The 401 every listener gives to a request without the token, in the API's error shape.
#[cfg(feature = "axum")]
pub fn unauthorized() -> axum::response::Response {
    use axum::http::{HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
            (header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")),
        ],
        UNAUTHORIZED_BODY,
    )
        .into_response()
}

/// `router` with every one of its routes behind the bearer token, or unchanged when there is no token
/// (an empty one counts as none, as in the config's check). Routes merged in later are not covered, so
/// guard each router before merging.
#[cfg(feature = "axum")]
pub fn require_bearer(router: axum::Router, token: Option<&str>) -> axum::Router {
    use axum::extract::Request;
    use axum::middleware::{self, Next};
    use std::sync::Arc;
    let Some(token) = token.filter(|t| !t.is_empty()) else { return router };
    let token: Arc<str> = Arc::from(token);
    router.route_layer(middleware::from_fn(move |request: Request, next: Next| {
        let token = token.clone();
        async move {
            if bearer_matches(request.headers(), &token) { next.run(request).await } else { unauthorized() }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(authorization).unwrap());
        h
    }

    #[test]
    fn equal_secrets_match_and_others_do_not() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(same_secret(b"", b""));
        assert!(!same_secret(b"s3cret", b"s3creT"));
        assert!(!same_secret(b"s3cret", b"s3cre"), "a prefix is not the secret");
        assert!(!same_secret(b"s3cret", b"s3cret\0"), "nor is the secret with a byte more");
        assert!(!same_secret(b"", b"s3cret"));
    }

    proptest! {
        #[test]
        fn same_secret_is_equality(a in proptest::collection::vec(any::<u8>(), 0..80),
                                   b in proptest::collection::vec(any::<u8>(), 0..80)) {
            prop_assert_eq!(same_secret(&a, &b), a == b);
            prop_assert!(same_secret(&a, &a));
        }
    }

    #[test]
    fn bearer_header_is_parsed_strictly() {
        assert!(bearer_matches(&headers("Bearer s3cret"), "s3cret"));
        assert!(bearer_matches(&headers("bearer s3cret"), "s3cret"), "the scheme is case-insensitive");
        assert!(bearer_matches(&headers("Bearer  s3cret "), "s3cret"));
        assert!(!bearer_matches(&headers("Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(&headers("Basic s3cret"), "s3cret"));
        assert!(!bearer_matches(&headers("s3cret"), "s3cret"));
        assert!(!bearer_matches(&headers("Bearer"), "s3cret"));
        assert!(!bearer_matches(&HeaderMap::new(), "s3cret"));
    }
}
