//! Request signatures of the HTTP doors, verified over the raw body in constant time.
//!
//! Input: the shared secret, the signature and timestamp headers, the raw body and the current
//! time. Output: `Ok` or the reason the request is refused. Pure: the caller passes the clock.
//!
//! - Customer.io: `X-CIO-Signature` = hex HMAC-SHA256(key, `v0:<X-CIO-Timestamp>:<body>`),
//!   `X-CIO-Timestamp` in unix seconds.
//! - Signal: `X-Signature: sha256=<hex HMAC-SHA256(secret, X-Timestamp + "." + body)>`,
//!   `X-Timestamp` in unix milliseconds.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A header is missing.
    #[error("missing `{0}` header")]
    Missing(&'static str),
    /// A header cannot be read.
    #[error("malformed `{0}` header")]
    Malformed(&'static str),
    /// The timestamp is outside the tolerance.
    #[error("timestamp is {}, outside the {tolerance_secs} s tolerance{unit_hint}", age(*.age_secs))]
    Stale {
        /// How old (negative: how far in the future).
        age_secs: i64,
        /// The tolerance crossed (for a timestamp in the future, at most five minutes).
        tolerance_secs: i64,
        /// What the timestamp looks like when it seems to be in the wrong unit, else empty.
        unit_hint: &'static str,
    },
    /// The signature does not match.
    #[error("signature does not match the body")]
    Mismatch,
}

fn verify(
    secret: &[u8],
    parts: &[&[u8]],
    signature_hex: &str,
    header: &'static str,
) -> Result<(), SignatureError> {
    let expected = hex::decode(signature_hex.trim()).map_err(|_| SignatureError::Malformed(header))?;
    let mut mac = HmacSha256::new_from_slice(secret).map_err(|_| SignatureError::Mismatch)?;
    for p in parts {
        mac.update(p);
    }
    // `verify_slice` compares in constant time.
    mac.verify_slice(&expected).map_err(|_| SignatureError::Mismatch)
}

fn age(age_secs: i64) -> String {
    if age_secs < 0 {
        format!("{} s in the future", age_secs.unsigned_abs())
    } else {
        format!("{age_secs} s old")
    }
}

/// How far in the future a timestamp may be, at most: clocks differ a little, but a sender
/// signs requests when it sends them, so the tolerance for old ones (retries) is not needed.
const FUTURE_SKEW_SECS: i64 = 300;

fn check_age(age_secs: i64, tolerance_secs: i64, unit_hint: &'static str) -> Result<(), SignatureError> {
    let allowed = if age_secs < 0 {
        tolerance_secs.min(FUTURE_SKEW_SECS)
    } else {
        tolerance_secs
    };
    if age_secs.unsigned_abs() > allowed.unsigned_abs() {
        return Err(SignatureError::Stale {
            age_secs,
            // The bound that was crossed: the future one for a timestamp ahead of the clock.
            tolerance_secs: allowed,
            unit_hint,
        });
    }
    Ok(())
}

/// Timestamps from this many seconds since the epoch on are far in the future (year 5138), and
/// as milliseconds are in 1973: a number that size or larger is taken for milliseconds.
const MILLIS_FROM: i64 = 100_000_000_000;

/// Verifies a Customer.io reporting webhook.
pub fn verify_customerio(
    key: &str,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let ts = timestamp
        .ok_or(SignatureError::Missing("X-CIO-Timestamp"))?
        .trim();
    let sig = signature.ok_or(SignatureError::Missing("X-CIO-Signature"))?;
    let ts_num: i64 = ts
        .parse()
        .map_err(|_| SignatureError::Malformed("X-CIO-Timestamp"))?;
    verify(
        key.as_bytes(),
        &[b"v0:", ts.as_bytes(), b":", body],
        sig,
        "X-CIO-Signature",
    )?;
    let unit_hint = if ts_num >= MILLIS_FROM {
        " (`X-CIO-Timestamp` is in seconds since the epoch; this one looks like milliseconds)"
    } else {
        ""
    };
    check_age(now_secs.saturating_sub(ts_num), tolerance_secs, unit_hint)
}

/// Verifies a Signal HTTP ingestion request.
pub fn verify_signal(
    secret: &str,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now_ms: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let ts = timestamp.ok_or(SignatureError::Missing("X-Timestamp"))?.trim();
    let sig = signature.ok_or(SignatureError::Missing("X-Signature"))?.trim();
    let sig = sig
        .strip_prefix("sha256=")
        .ok_or(SignatureError::Malformed("X-Signature"))?;
    let ts_ms: i64 = ts.parse().map_err(|_| SignatureError::Malformed("X-Timestamp"))?;
    verify(
        secret.as_bytes(),
        &[ts.as_bytes(), b".", body],
        sig,
        "X-Signature",
    )?;
    let unit_hint = if ts_ms.unsigned_abs() < MILLIS_FROM.unsigned_abs() {
        " (`X-Timestamp` is in milliseconds since the epoch; this one looks like seconds)"
    } else {
        ""
    };
    check_age(now_ms.saturating_sub(ts_ms) / 1000, tolerance_secs, unit_hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors computed outside this code, with Python's hmac module:
    //   hmac.new(b"cio-key", b"v0:1613063089:{\"a\":1}", hashlib.sha256).hexdigest()
    //   hmac.new(b"sig-secret", b"1700000000000.{\"a\":1}", hashlib.sha256).hexdigest()
    const CIO_SIG: &str = "1f0b910df1ba019784c7c6f77166e3923e61361ff8210d7c3f983a638e75e3db";
    const SIGNAL_SIG: &str = "c4152aff3864503f495cf13971ca74672f77e3744e5fb03bf69a5d73b2c63f87";

    #[test]
    fn customerio_signatures_match_independent_vectors() {
        let body = br#"{"a":1}"#;
        assert_eq!(
            verify_customerio(
                "cio-key",
                Some("1613063089"),
                Some(CIO_SIG),
                body,
                1613063089,
                300
            ),
            Ok(())
        );
        assert_eq!(
            verify_customerio(
                "cio-key",
                Some("1613063089"),
                Some(CIO_SIG),
                br#"{"a":2}"#,
                1613063089,
                300
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_customerio("other", Some("1613063089"), Some(CIO_SIG), body, 1613063089, 300),
            Err(SignatureError::Mismatch)
        );
        assert!(matches!(
            verify_customerio(
                "cio-key",
                Some("1613063089"),
                Some(CIO_SIG),
                body,
                1613063089 + 301,
                300
            ),
            Err(SignatureError::Stale { .. })
        ));
        assert_eq!(
            verify_customerio("cio-key", None, Some(CIO_SIG), body, 0, 300),
            Err(SignatureError::Missing("X-CIO-Timestamp"))
        );
        assert_eq!(
            verify_customerio("cio-key", Some("1"), Some("zz"), body, 1, 300),
            Err(SignatureError::Malformed("X-CIO-Signature"))
        );
    }

    #[test]
    fn signal_signatures_match_independent_vectors() {
        let body = br#"{"a":1}"#;
        let sig = format!("sha256={SIGNAL_SIG}");
        let now = 1_700_000_000_000;
        assert_eq!(
            verify_signal("sig-secret", Some("1700000000000"), Some(&sig), body, now, 300),
            Ok(())
        );
        assert_eq!(
            verify_signal("sig-secret", Some("1700000000001"), Some(&sig), body, now, 300),
            Err(SignatureError::Mismatch)
        );
        assert!(matches!(
            verify_signal(
                "sig-secret",
                Some("1700000000000"),
                Some(&sig),
                body,
                now - 301_000,
                300
            ),
            Err(SignatureError::Stale { .. })
        ));
        assert_eq!(
            verify_signal(
                "sig-secret",
                Some("1700000000000"),
                Some(SIGNAL_SIG),
                body,
                now,
                300
            ),
            Err(SignatureError::Malformed("X-Signature"))
        );
    }

    /// Hex HMAC-SHA256 of `parts` under `secret`.
    fn sign(secret: &str, parts: &[&[u8]]) -> String {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).unwrap();
        for p in parts {
            mac.update(p);
        }
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn a_timestamp_in_the_other_unit_is_named() {
        let body = br#"{"a":1}"#;
        // Signal wants milliseconds; a sender giving seconds is told so.
        let now_ms = 1_700_000_000_000;
        let sig = format!("sha256={}", sign("s", &[b"1700000000", b".", body]));
        let e = verify_signal("s", Some("1700000000"), Some(&sig), body, now_ms, 300).unwrap_err();
        assert!(e.to_string().contains("`X-Timestamp` is in milliseconds"), "{e}");
        // A stale timestamp in the right unit gets no such note.
        let sig = format!("sha256={}", sign("s", &[b"1600000000000", b".", body]));
        let e = verify_signal("s", Some("1600000000000"), Some(&sig), body, now_ms, 300).unwrap_err();
        assert!(!e.to_string().contains("looks like"), "{e}");
        // Customer.io signs seconds.
        let sig = sign("k", &[b"v0:", b"1700000000000", b":", body]);
        let e =
            verify_customerio("k", Some("1700000000000"), Some(&sig), body, 1_700_000_000, 300).unwrap_err();
        assert!(e.to_string().contains("`X-CIO-Timestamp` is in seconds"), "{e}");
    }

    #[test]
    fn extreme_and_future_timestamps_are_stale_not_overflows() {
        let body = br#"{"a":1}"#;
        let week = 7 * 24 * 3600;
        let now = 1_700_000_000;
        for ts in [i64::MIN, i64::MIN + 1, -9_223_372_036_854_775_000, i64::MAX] {
            let t = ts.to_string();
            let sig = sign("k", &[b"v0:", t.as_bytes(), b":", body]);
            let e = verify_customerio("k", Some(&t), Some(&sig), body, now, week).unwrap_err();
            assert!(matches!(e, SignatureError::Stale { .. }), "{ts}: {e}");
            let sig = format!("sha256={}", sign("s", &[t.as_bytes(), b".", body]));
            let e = verify_signal("s", Some(&t), Some(&sig), body, now * 1000, 300).unwrap_err();
            assert!(matches!(e, SignatureError::Stale { .. }), "{ts}: {e}");
        }
        // A week old is within Customer.io's tolerance; ten minutes ahead is not: only clock skew
        // is allowed into the future.
        let old = (now - week + 60).to_string();
        let sig = sign("k", &[b"v0:", old.as_bytes(), b":", body]);
        assert_eq!(
            verify_customerio("k", Some(&old), Some(&sig), body, now, week),
            Ok(())
        );
        let ahead = (now + 600).to_string();
        let sig = sign("k", &[b"v0:", ahead.as_bytes(), b":", body]);
        let e = verify_customerio("k", Some(&ahead), Some(&sig), body, now, week).unwrap_err();
        assert_eq!(
            e.to_string(),
            "timestamp is 600 s in the future, outside the 300 s tolerance"
        );
        let ahead = (now + 200).to_string();
        let sig = sign("k", &[b"v0:", ahead.as_bytes(), b":", body]);
        assert_eq!(
            verify_customerio("k", Some(&ahead), Some(&sig), body, now, week),
            Ok(())
        );
    }
}
