//! Console sessions as signed cookies: the login form trades the admin token
//! for a cookie that says when it expires, signed with a key derived from
//! that token and a secret kept in the ledger (so a leaked cookie cannot be
//! used to guess the token offline). Every replica that shares the token
//! accepts it; changing the token ends every session; logging out ends one
//! (the ledger keeps it until it would have expired). Each session has its
//! own CSRF token, derived from the same key, which every state-changing form
//! carries.

use chrono::{DateTime, Utc};
use ring::hmac;

pub const COOKIE: &str = "reaper_session";

/// What a valid cookie proves.
#[derive(Debug, Clone)]
pub struct Session {
    /// The cookie's random part: what a logout records.
    pub id: String,
    pub expires: DateTime<Utc>,
    /// The token every form of this session must post back as `csrf`.
    pub csrf: String,
}

/// Signs and checks sessions with a key only the admin token can give.
#[derive(Clone)]
pub struct Sessions {
    key: hmac::Key,
    ttl: chrono::Duration,
}

impl Sessions {
    pub fn new(admin_token: &str, secret: &[u8], ttl: std::time::Duration) -> Sessions {
        // A key of its own: the token and the ledger's secret, so a cookie
        // carries nothing the token could be recovered or guessed from.
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derived = hmac::sign(&root, format!("reaper console sessions v1\0{admin_token}").as_bytes());
        Sessions {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
            ttl: chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(8)),
        }
    }

    /// A new session's cookie value: `v1.<expiry>.<nonce>.<signature>`.
    pub fn issue(&self, now: DateTime<Utc>) -> String {
        let payload = format!("v1.{}.{}", (now + self.ttl).timestamp(), uuid::Uuid::new_v4().simple());
        let sig = hex(hmac::sign(&self.key, payload.as_bytes()).as_ref());
        format!("{payload}.{sig}")
    }

    pub fn ttl_secs(&self) -> i64 {
        self.ttl.num_seconds()
    }

    /// The session a cookie value stands for, if its signature holds and it
    /// has not expired.
    pub fn check(&self, cookie: &str, now: DateTime<Utc>) -> Option<Session> {
        let (payload, sig) = cookie.rsplit_once('.')?;
        let mut parts = payload.split('.');
        let (Some("v1"), Some(expires), Some(nonce), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        hmac::verify(&self.key, payload.as_bytes(), &unhex(sig)?).ok()?;
        let expires = DateTime::from_timestamp(expires.parse().ok()?, 0)?;
        if expires <= now {
            return None;
        }
        let csrf = hex(hmac::sign(&self.key, format!("csrf.{nonce}").as_bytes()).as_ref());
        Some(Session { id: nonce.to_string(), expires, csrf })
    }
}

impl Session {
    /// Whether a form's `csrf` field is this session's, compared in constant time.
    pub fn csrf_ok(&self, given: &str) -> bool {
        crate::config::constant_time_eq(self.csrf.as_bytes(), given.as_bytes())
    }
}

/// The cookie's value in a `Cookie` header, if there is one.
pub fn from_header(cookies: &str) -> Option<&str> {
    cookies.split(';').filter_map(|c| c.trim().split_once('=')).find(|(k, _)| *k == COOKIE).map(|(_, v)| v)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_holds_until_it_expires_and_only_with_its_own_signature() {
        let s = Sessions::new("s3cret", b"ledger secret", std::time::Duration::from_secs(60));
        let now = Utc::now();
        let cookie = s.issue(now);
        let session = s.check(&cookie, now).expect("a fresh cookie is valid");
        assert!(session.csrf_ok(&session.csrf));
        assert!(!session.csrf_ok("0000"));
        assert!(s.check(&cookie, now + chrono::Duration::seconds(61)).is_none(), "expired");
        // Another token's or another secret's sessions, a changed expiry, a cut signature: refused.
        assert!(Sessions::new("other", b"ledger secret", std::time::Duration::from_secs(60))
            .check(&cookie, now)
            .is_none());
        assert!(Sessions::new("s3cret", b"another secret", std::time::Duration::from_secs(60))
            .check(&cookie, now)
            .is_none());
        let (payload, sig) = cookie.rsplit_once('.').unwrap();
        let later = payload.replacen(&payload[3..13], "9999999999", 1);
        assert!(s.check(&format!("{later}.{sig}"), now).is_none());
        assert!(s.check(&cookie[..cookie.len() - 2], now).is_none());
        assert!(s.check("", now).is_none());
        // Two sessions have two CSRF tokens.
        let other = s.check(&s.issue(now), now).unwrap();
        assert_ne!(other.csrf, session.csrf);
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        assert_eq!(from_header("a=1; reaper_session=v1.x.y.z; b=2"), Some("v1.x.y.z"));
        assert_eq!(from_header("a=1"), None);
    }
}
