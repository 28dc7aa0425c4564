//! The credential an HTTP provider sends, kept fresh. Cloud tokens expire
//! (an hour is common); a worker that read its token once would dead-letter
//! every job after that. Each source says when its token is stale; the cache
//! is behind one lock, so however many steps are in flight, one of them
//! fetches and the rest wait for its answer. A 401 marks the token it was
//! answered to as stale (only that one, so fifty 401s cause one refresh).
//!
//! Secrets (tokens, client secrets, API keys) are never put in an error or a
//! log line: errors say which source failed and why in other words.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderName, HeaderValue};

use super::StepError;
use crate::config::{AuthSettings, OAuth2Settings};

pub struct Credentials {
    provider: String,
    header: HeaderName,
    scheme: String,
    source: Source,
    cache: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    token: Option<Cached>,
    /// The last fetch failed (when, why): steps that waited on the lock for
    /// it get the same answer for [`FAILURE_HOLD`] instead of each waiting
    /// out the endpoint's timeout again, one after the other.
    failed: Option<(Instant, StepError)>,
    /// The last token a 401 made us drop. A 401 to it again means the fresh
    /// fetch gave the same token back (a cached helper, an unchanged file):
    /// fetching once more would not help, so the 401 counts.
    refused: Option<HeaderValue>,
}

enum Source {
    /// Read once (from the environment at start-up).
    Fixed(String),
    File(PathBuf),
    OAuth2 {
        settings: OAuth2Settings,
        secret: Secret,
        client: reqwest::Client,
    },
    Command {
        argv: Vec<String>,
        ttl: Duration,
        timeout: Duration,
    },
}

/// Where an OAuth2 secret is read from, each time a token is fetched (a
/// rotated secret file is picked up).
enum Secret {
    Env(String),
    File(PathBuf),
}

struct Cached {
    value: HeaderValue,
    /// Past this the token is fetched again before use.
    fresh_until: Option<Instant>,
    /// What told the file apart when it was read (see [`file_stamp`]).
    file_stamp: Option<FileStamp>,
}

/// The longest an OAuth2 token is used before being refreshed, when the
/// endpoint does not say (`expires_in` missing).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// How long a failed fetch answers for the next ones.
const FAILURE_HOLD: Duration = Duration::from_secs(5);

/// The longest a token request or command may take, whatever the provider's
/// own timeout: every step waits on it.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

impl Credentials {
    /// Checks the settings and reads what is read once; nothing is fetched yet.
    pub fn build(provider: &str, a: &AuthSettings, client: &reqwest::Client) -> Result<Credentials, String> {
        let header =
            HeaderName::from_bytes(a.header.as_bytes()).map_err(|_| format!("bad auth header name {:?}", a.header))?;
        let given = [a.token_env.is_some(), a.token_file.is_some(), a.oauth2.is_some(), a.token_command.is_some()];
        let source = match given.iter().filter(|g| **g).count() {
            0 => return Err("auth needs one of token_env, token_file, oauth2 or token_command".into()),
            1 => source(a, client)?,
            _ => return Err("auth takes one of token_env, token_file, oauth2 or token_command, not several".into()),
        };
        let creds = Credentials {
            provider: provider.to_string(),
            header,
            scheme: a.scheme.clone(),
            source,
            cache: tokio::sync::Mutex::new(State::default()),
        };
        // What can be read now is checked now: a bad token stops start-up.
        match &creds.source {
            Source::Fixed(token) => drop(creds.header_value(token)?),
            Source::File(path) => {
                let token =
                    std::fs::read_to_string(path).map_err(|e| format!("auth.token_file {}: {e}", path.display()))?;
                creds.header_value(token.trim())?;
            }
            _ => {}
        }
        Ok(creds)
    }

    /// The header to send now, fetched first when the cached token is stale.
    pub async fn header(&self) -> Result<(HeaderName, HeaderValue), StepError> {
        let mut state = self.cache.lock().await;
        let stamp = match &self.source {
            Source::File(path) => Some(file_stamp(path).map_err(|e| self.fail(&e))?),
            _ => None,
        };
        let fresh = state.token.as_ref().is_some_and(|c| {
            c.fresh_until.is_none_or(|t| Instant::now() < t) && (stamp.is_none() || c.file_stamp == stamp)
        });
        if !fresh {
            if let Some((at, e)) = &state.failed {
                if at.elapsed() < FAILURE_HOLD {
                    return Err(e.clone());
                }
            }
            match self.fetch(stamp).await {
                Ok(token) => {
                    state.token = Some(token);
                    state.failed = None;
                }
                Err(e) => {
                    state.failed = Some((Instant::now(), e.clone()));
                    return Err(e);
                }
            }
        }
        Ok((self.header.clone(), state.token.as_ref().expect("filled above").value.clone()))
    }

    /// The API answered 401 to `sent`: forget that token, if it is still the
    /// one cached. True when fetching again could help.
    pub async fn rejected(&self, sent: &HeaderValue) -> bool {
        if matches!(self.source, Source::Fixed(_)) {
            return false;
        }
        let mut state = self.cache.lock().await;
        let cached_is_sent = state.token.as_ref().is_some_and(|c| c.value == *sent);
        if !cached_is_sent {
            // Another step's 401 dropped it already (a new one is or will be
            // fetched): retry with that.
            return true;
        }
        if state.refused.as_ref() == Some(sent) {
            // Dropped once for a 401 and fetched back unchanged.
            return false;
        }
        state.token = None;
        state.refused = Some(sent.clone());
        true
    }

    async fn fetch(&self, file_stamp: Option<FileStamp>) -> Result<Cached, StepError> {
        let (token, fresh_for) = match &self.source {
            Source::Fixed(token) => (token.clone(), None),
            Source::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| self.fail(&format!("token_file {}: {e}", path.display())))?;
                (text.trim().to_string(), None)
            }
            Source::OAuth2 { settings, secret, client } => {
                let (token, lifetime) = self.oauth2(settings, secret, client).await?;
                (token, Some(lifetime))
            }
            Source::Command { argv, ttl, timeout } => (self.command(argv, *timeout).await?, Some(*ttl)),
        };
        if token.is_empty() {
            return Err(self.fail("the token is empty"));
        }
        let value = self.header_value(&token).map_err(|e| self.fail(&e))?;
        Ok(Cached { value, fresh_until: fresh_for.map(|d| Instant::now() + d), file_stamp })
    }

    fn header_value(&self, token: &str) -> Result<HeaderValue, String> {
        let text = if self.scheme.is_empty() { token.to_string() } else { format!("{} {token}", self.scheme) };
        let mut value =
            HeaderValue::from_str(&text).map_err(|_| "the token is not a valid header value".to_string())?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// Posts the grant; the token is used until a little before it expires.
    async fn oauth2(
        &self,
        s: &OAuth2Settings,
        secret: &Secret,
        client: &reqwest::Client,
    ) -> Result<(String, Duration), StepError> {
        let secret = match secret {
            Secret::Env(var) => std::env::var(var)
                .map_err(|_| self.fail(&format!("oauth2.client_secret_env names {var}, which is not set")))?,
            Secret::File(path) => std::fs::read_to_string(path)
                .map_err(|e| self.fail(&format!("oauth2.client_secret_file {}: {e}", path.display())))?
                .trim()
                .to_string(),
        };
        let mut form: Vec<(&str, &str)> = vec![];
        if !s.form.contains_key("grant_type") {
            form.push(("grant_type", "client_credentials"));
        }
        form.extend(s.form.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(id) = &s.client_id {
            form.push(("client_id", id));
        }
        if let Some(scope) = &s.scope {
            form.push(("scope", scope));
        }
        form.push((s.secret_field.as_str(), secret.as_str()));
        let body = encode_form(&form);
        let url = crate::config::redact_url(&s.token_url);
        let resp = client
            .post(&s.token_url)
            .timeout(FETCH_TIMEOUT)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                StepError::Transient(format!("provider {}: token endpoint {url}: {}", self.provider, cause(&e)))
            })?;
        let status = resp.status();
        if !status.is_success() {
            // The body is not quoted: some endpoints echo what they were sent.
            let why = format!("token endpoint {url} answered {status}");
            return Err(if status.is_client_error() && ![408, 429].contains(&status.as_u16()) {
                StepError::Permanent(format!(
                    "provider {}: {why}: check oauth2's client_id, secret and form fields",
                    self.provider
                ))
            } else {
                StepError::Transient(format!("provider {}: {why}", self.provider))
            });
        }
        /// Some endpoints (Azure AD v1) send `expires_in` as a string.
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Seconds {
            N(f64),
            S(String),
        }
        #[derive(serde::Deserialize)]
        struct Grant {
            access_token: String,
            expires_in: Option<Seconds>,
        }
        let grant: Grant = resp
            .json()
            .await
            .map_err(|_| self.fail(&format!("token endpoint {url} answered {status} without a JSON access_token")))?;
        let lifetime = grant
            .expires_in
            .and_then(|s| match s {
                Seconds::N(n) => Some(n),
                Seconds::S(t) => t.trim().parse().ok(),
            })
            .filter(|s: &f64| s.is_finite() && *s > 0.0)
            .map(|s| Duration::from_secs_f64(s.min(86_400.0)))
            .unwrap_or(DEFAULT_LIFETIME);
        // Refreshed a little early: a fifth of its life, at most a minute.
        let margin = (lifetime / 5).min(Duration::from_secs(60));
        Ok((grant.access_token, lifetime - margin))
    }

    /// Runs the command (no shell) and takes its first line of output.
    async fn command(&self, argv: &[String], timeout: Duration) -> Result<String, StepError> {
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(std::process::Stdio::null()).kill_on_drop(true);
        // reaper's own settings (the broker's and database's URLs, the admin
        // token) are none of the helper's business.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("REAPER_") {
                cmd.env_remove(name);
            }
        }
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| self.fail(&format!("token_command {:?} did not finish within {timeout:?}", argv[0])))?
            .map_err(|e| self.fail(&format!("token_command {:?} could not run: {e}", argv[0])))?;
        if !out.status.success() {
            // Its stderr is not quoted: a credential helper may print secrets there.
            return Err(self.fail(&format!("token_command {:?} failed ({})", argv[0], out.status)));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().next().unwrap_or("").trim().to_string())
    }

    /// A credential that cannot be had now: transient (a rotated file, an
    /// endpoint back up), so the job waits in the retry queue, then dead-letters.
    fn fail(&self, why: &str) -> StepError {
        StepError::Transient(format!("provider {}: no credential: {why}", self.provider))
    }
}

fn source(a: &AuthSettings, client: &reqwest::Client) -> Result<Source, String> {
    if let Some(var) = &a.token_env {
        let token = std::env::var(var).map_err(|_| format!("auth.token_env names {var}, which is not set"))?;
        return Ok(Source::Fixed(token.trim().to_string()));
    }
    if let Some(file) = &a.token_file {
        let path = PathBuf::from(file);
        std::fs::metadata(&path).map_err(|e| format!("auth.token_file {file}: {e}"))?;
        return Ok(Source::File(path));
    }
    if let Some(o) = &a.oauth2 {
        reqwest::Url::parse(&o.token_url).map_err(|e| format!("auth.oauth2.token_url: {e}"))?;
        let secret = match (&o.client_secret_env, &o.client_secret_file) {
            (Some(var), None) => {
                std::env::var(var)
                    .map_err(|_| format!("auth.oauth2.client_secret_env names {var}, which is not set"))?;
                Secret::Env(var.clone())
            }
            (None, Some(file)) => {
                std::fs::metadata(file).map_err(|e| format!("auth.oauth2.client_secret_file {file}: {e}"))?;
                Secret::File(PathBuf::from(file))
            }
            _ => return Err("auth.oauth2 needs one of client_secret_env or client_secret_file".into()),
        };
        return Ok(Source::OAuth2 { settings: (**o).clone(), secret, client: client.clone() });
    }
    let argv = a.token_command.clone().unwrap_or_default();
    if argv.first().is_none_or(|p| p.is_empty()) {
        return Err("auth.token_command needs a program: [\"program\", \"arg\", ...]".into());
    }
    let secs = |name: &str, v: f64| {
        (v.is_finite() && v > 0.0 && v <= 86_400.0)
            .then(|| Duration::from_secs_f64(v))
            .ok_or(format!("auth.{name} must be between 0 and 86400 seconds"))
    };
    Ok(Source::Command {
        argv,
        ttl: secs("token_ttl_secs", a.token_ttl_secs)?,
        timeout: secs("command_timeout_secs", a.command_timeout_secs)?,
    })
}

/// What tells a changed file: its inode (a swapped file, as Kubernetes
/// does), its change and modification times to the nanosecond, and its length.
type FileStamp = (u64, i64, i64, SystemTime, u64);

fn file_stamp(path: &std::path::Path) -> Result<FileStamp, String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .and_then(|m| Ok((m.ino(), m.ctime(), m.ctime_nsec(), m.modified()?, m.len())))
        .map_err(|e| format!("token_file {}: {e}", path.display()))
}

/// `application/x-www-form-urlencoded`, every byte outside the unreserved set encoded.
fn encode_form(fields: &[(&str, &str)]) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    fields
        .iter()
        .map(|(k, v)| {
            format!("{}={}", utf8_percent_encode(k, NON_ALPHANUMERIC), utf8_percent_encode(v, NON_ALPHANUMERIC))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A request error's causes, without its URL (which may carry a query).
fn cause(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() { "timed out".to_string() } else { "no answer".to_string() };
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_encodes_every_reserved_byte() {
        let body = encode_form(&[("grant_type", "urn:ibm:params:oauth:grant-type:apikey"), ("apikey", "a&b=c d+")]);
        assert_eq!(body, "grant%5Ftype=urn%3Aibm%3Aparams%3Aoauth%3Agrant%2Dtype%3Aapikey&apikey=a%26b%3Dc%20d%2B");
    }
}
