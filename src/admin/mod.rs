//! The admin stage: operator APIs behind the admin bearer token.
//!
//! Input: admin calls (gRPC). Output: views of and changes to the relay's state. The token comes
//! from `--admin-token`, or is generated at first start, stored in the data directory (mode 0600)
//! and printed once. Every call compares the token in constant time. Never maps or delivers.

pub mod catalog;
pub mod dead_letters;
pub mod grpc;
pub mod http;
pub mod integrations;
pub mod rules;
pub mod store;

use std::path::Path;

use subtle::ConstantTimeEq;

use crate::integration::Secret;

/// The file in the data directory holding a generated admin token.
pub const TOKEN_FILE: &str = "admin-token";

/// The admin token in force.
#[derive(Debug, Clone)]
pub struct AdminToken(Secret);

impl AdminToken {
    /// Uses `configured`, else the token stored in `data_dir`, else generates and stores one.
    /// Returns the token and whether it was generated now (so it can be printed once).
    pub fn load_or_create(
        configured: Option<Secret>,
        data_dir: &Path,
    ) -> std::io::Result<(AdminToken, bool)> {
        if let Some(t) = configured {
            return Ok((AdminToken(t), false));
        }
        let path = data_dir.join(TOKEN_FILE);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let t = text.trim();
            if !t.is_empty() {
                return Ok((AdminToken(Secret::new(t)), false));
            }
        }
        std::fs::create_dir_all(data_dir)?;
        let token = format!("lr_{}", uuid::Uuid::new_v4().simple());
        write_private(&path, &token)?;
        Ok((AdminToken(Secret::new(token)), true))
    }

    /// The token, for printing once at creation.
    pub fn secret(&self) -> &Secret {
        &self.0
    }

    /// Checks an `Authorization` header value (`Bearer <token>`) in constant time.
    pub fn check(&self, header: Option<&str>) -> bool {
        let Some(value) = header else { return false };
        // The scheme's name is case-insensitive (RFC 9110 §11.1).
        match value.split_once(' ') {
            Some((scheme, given)) if scheme.eq_ignore_ascii_case("bearer") => self.check_token(Some(given)),
            _ => false,
        }
    }

    /// Checks a bare token (the `/live` page's `?token=`, since browsers cannot set headers on
    /// server-sent events) in constant time.
    pub fn check_token(&self, given: Option<&str>) -> bool {
        let Some(given) = given else { return false };
        given.trim().as_bytes().ct_eq(self.0.expose().as_bytes()).into()
    }

    /// A gRPC interceptor that refuses calls without the token.
    pub fn interceptor(
        &self,
    ) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone + use<> {
        let token = self.clone();
        move |req: tonic::Request<()>| {
            let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
            if token.check(header) {
                Ok(req)
            } else {
                Err(tonic::Status::unauthenticated(
                    "missing or wrong admin token: send `authorization: Bearer <admin token>`",
                ))
            }
        }
    }
}

#[cfg(unix)]
fn write_private(path: &Path, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(token.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, token: &str) -> std::io::Result<()> {
    std::fs::write(path, token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_is_stored_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = AdminToken::load_or_create(None, dir.path()).unwrap();
        assert!(created);
        let (b, created) = AdminToken::load_or_create(None, dir.path()).unwrap();
        assert!(!created);
        assert_eq!(a.secret().expose(), b.secret().expose());
        let bearer = format!("Bearer {}", a.secret().expose());
        assert!(a.check(Some(&bearer)));
        assert!(!a.check(Some("Bearer nope")));
        assert!(a.check(Some(&format!("BEARER {}", a.secret().expose()))));
        assert!(!a.check(Some(&format!("Basic {}", a.secret().expose()))));
        assert!(!a.check(Some(a.secret().expose())));
        assert!(!a.check(None));
    }
}
