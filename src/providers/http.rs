//! The HTTP provider: one pooled reqwest client per configured API, request
//! templates filled with percent-encoded values, a concurrency cap and a request
//! rate shared by every job, and a pause that a 429 imposes on all of them.

use std::collections::BTreeMap;
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use tokio::sync::{Mutex, Semaphore};
use tokio::time::Instant;

use super::credentials::Credentials;
use super::listing::{json_text, Item, Pages};
use super::{Deleted, ProviderError, StepError};
use crate::config::reconcile::InventorySettings;
use crate::config::{redact_url, HttpProviderSettings};
use crate::domain::parse_time;
use crate::domain::Resource;
use chrono::DateTime;

/// Everything but RFC 3986 unreserved characters is encoded, `/` included, so a
/// value can never step out of its path segment. Dots stay as they are (so do
/// `%2E`s for a URL parser), which is why `.`, `..` and empty values are refused
/// in [`RequestTemplate::render`]: the parser would remove or collapse them.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Longest pause a server's Retry-After can impose, so a bogus header can't park us.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// "METHOD /path/{id}/{attr.NAME}", parsed once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTemplate {
    method: Method,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Id,
    Attr(String),
}

impl RequestTemplate {
    pub fn parse(s: &str) -> Result<RequestTemplate, String> {
        let (method, path) = s.trim().split_once(' ').ok_or_else(|| format!("{s:?} is not \"METHOD /path\""))?;
        // Any token is a valid HTTP method; a typo (`DELET`) would only fail
        // at the API, at the first teardown. Only the methods a kind can mean.
        const METHODS: [&str; 6] = ["DELETE", "GET", "POST", "PUT", "PATCH", "HEAD"];
        if !METHODS.contains(&method) {
            return Err(format!("method {method:?} is not one of {}", METHODS.join(", ")));
        }
        let method = Method::from_bytes(method.as_bytes()).map_err(|_| format!("bad method {method:?}"))?;
        let path = path.trim();
        if !path.starts_with('/') {
            return Err(format!("path {path:?} must start with '/'"));
        }
        let mut parts = Vec::new();
        let mut rest = path;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..].find('}').ok_or_else(|| format!("unclosed '{{' in {path:?}"))? + open;
            let name = &rest[open + 1..close];
            parts.push(match name {
                "id" => Part::Id,
                _ => match name.strip_prefix("attr.") {
                    Some(a) if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c)) => {
                        Part::Attr(a.to_string())
                    }
                    _ => {
                        return Err(format!(
                            "placeholder {{{name}}} is not {{id}} or {{attr.NAME}} (NAME of letters, digits, '_', '-'); is a '}}' missing?"
                        ))
                    }
                },
            });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("stray '}}' in {path:?}"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(RequestTemplate { method, parts })
    }

    /// Whether the path names the resource's id.
    pub fn uses_id(&self) -> bool {
        self.parts.contains(&Part::Id)
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    pub fn attributes(&self) -> impl Iterator<Item = String> + '_ {
        self.parts.iter().filter_map(|p| match p {
            Part::Attr(a) => Some(a.clone()),
            _ => None,
        })
    }

    /// "METHOD base/path" for a plan. Plans are printed and served: never
    /// with the base URL's credentials.
    pub fn describe(&self, base: Option<&HttpProviderSettings>, r: &Resource) -> Result<String, String> {
        let base = base.map(|h| redact_url(h.base_url.trim_end_matches('/'))).unwrap_or_default();
        Ok(format!("{} {base}{}", self.method, self.render(&r.id, &r.attributes)?))
    }

    /// The path with every value percent-encoded. An empty value is refused,
    /// and so is a segment holding a value that comes out empty, `.` or `..`
    /// (`{attr.a}{id}` with `.` and `.`, or `/x/.{id}` with `.`): a URL parser
    /// turns those into another path (`/zones/z1/records/..` is the zone), so
    /// the request would reach something nobody named.
    pub fn render(&self, id: &str, attributes: &BTreeMap<String, String>) -> Result<String, String> {
        let mut out = String::new();
        // Where the current segment starts, and the first value in it, if any.
        let mut segment: (usize, Option<&Part>) = (0, None);
        for p in &self.parts {
            let value = match p {
                Part::Literal(l) => {
                    for (i, piece) in l.split('/').enumerate() {
                        if i > 0 {
                            check_segment(&out[segment.0..], segment.1.take())?;
                            out.push('/');
                            segment.0 = out.len();
                        }
                        out.push_str(piece);
                    }
                    continue;
                }
                Part::Id => id,
                Part::Attr(a) => attributes.get(a).ok_or_else(|| format!("attribute {a:?} is missing"))?,
            };
            if value.is_empty() {
                return Err(format!("{} is empty, so it cannot name anything in a request path", p.name()));
            }
            out.extend(utf8_percent_encode(value, SEGMENT));
            segment.1.get_or_insert(p);
        }
        check_segment(&out[segment.0..], segment.1)?;
        Ok(out)
    }
}

impl Part {
    /// What a value placeholder stands for, in error messages.
    fn name(&self) -> String {
        match self {
            Part::Id => "id".into(),
            Part::Attr(a) => format!("attribute {a}"),
            Part::Literal(l) => format!("{l:?}"),
        }
    }
}

/// A path segment that holds a value (`what`) must not be one a URL parser
/// removes or collapses.
fn check_segment(segment: &str, value: Option<&Part>) -> Result<(), String> {
    match (value, segment) {
        (Some(p), "" | "." | "..") => Err(format!(
            "{} makes the path segment {segment:?}, which cannot be used in a request path: it would change which path is requested",
            p.name()
        )),
        _ => Ok(()),
    }
}

pub struct HttpProvider {
    name: String,
    client: reqwest::Client,
    base_url: String,
    /// The base URL's host, the name its certificate must carry.
    host: String,
    auth: Option<Credentials>,
    in_flight: Semaphore,
    pacer: Mutex<Pacer>,
}

/// Spaces requests by the configured rate and holds all of them back while a
/// 429's Retry-After runs.
struct Pacer {
    interval: Option<Duration>,
    next_slot: Instant,
    paused_until: Option<Instant>,
}

impl HttpProvider {
    pub fn build(name: &str, s: &HttpProviderSettings) -> Result<HttpProvider, ProviderError> {
        let err = |message: String| ProviderError::Build { provider: name.to_string(), message };
        let mut builder = reqwest::Client::builder();
        if let Some(ca) = &s.ca_file {
            let pem =
                crate::tls::read_certs(&format!("providers.{name}.ca_file"), ca).map_err(|e| err(e.to_string()))?;
            for cert in
                reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| err(format!("{ca:?}: {e}")))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .timeout(Duration::from_millis(s.timeout_ms))
            .connect_timeout(Duration::from_millis(s.connect_timeout_ms))
            .pool_max_idle_per_host(s.max_concurrency)
            // A redirected DELETE would go (with our credentials) somewhere no
            // template names, and a 303 would turn it into a GET whose 200 looks
            // like success: a 3xx is an error instead (see `request`).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| err(format!("building the HTTP client: {e}")))?;
        let auth = s.auth.as_ref().map(|a| Credentials::build(name, a, &client)).transpose().map_err(err)?;
        Ok(HttpProvider {
            name: name.to_string(),
            client,
            base_url: s.base_url.trim_end_matches('/').to_string(),
            host: reqwest::Url::parse(&s.base_url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or_default(),
            auth,
            in_flight: Semaphore::new(s.max_concurrency),
            pacer: Mutex::new(Pacer {
                interval: s.rate_per_sec.map(|r| Duration::from_secs_f64(1.0 / r)),
                next_slot: Instant::now(),
                paused_until: None,
            }),
        })
    }

    pub async fn delete(&self, t: &RequestTemplate, r: &Resource) -> Result<Deleted, StepError> {
        let status = self.send(t, r).await?;
        match status {
            s if s.is_success() => Ok(Deleted::Now),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(Deleted::AlreadyGone),
            other => Err(classify_status(other, "")),
        }
    }

    /// 2xx: it exists (or, for a guard, is in use); 404/410: it does not.
    pub async fn probe(&self, t: &RequestTemplate, r: &Resource) -> Result<bool, StepError> {
        match self.send(t, r).await? {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(false),
            other => Err(classify_status(other, "")),
        }
    }

    async fn send(&self, t: &RequestTemplate, r: &Resource) -> Result<StatusCode, StepError> {
        let path = t.render(&r.id, &r.attributes).map_err(StepError::Permanent)?;
        Ok(self.request(t.method(), &path).await?.status())
    }

    /// One page of a list, as JSON. A 404 is a failure here, not an empty
    /// list: an inventory that is not there must not look like one with nothing in it.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, StepError> {
        let resp = self.request(&Method::GET, path).await?;
        if !resp.status().is_success() {
            return Err(StepError::Permanent(format!("{} from the list", resp.status())));
        }
        resp.json().await.map_err(|e| StepError::Transient(format!("the answer is not JSON: {}", without_url(&e))))
    }

    /// Why a request got no answer: TLS said plainly, a network failure
    /// passes, anything else is the request's fault.
    fn send_error(&self, method: &Method, path: &str, e: reqwest::Error) -> StepError {
        if let Some(tls) = crate::tls::explain(&e, &self.host, &format!("providers.{}.ca_file", self.name)) {
            // Transient: a certificate is rotated or a CA added without a new job.
            StepError::Transient(format!("{method} {path}: {}: {tls}", self.host))
        } else if e.is_timeout() || e.is_connect() || e.is_request() {
            StepError::Transient(format!("{method} {path}: {}", without_url(&e)))
        } else {
            StepError::Permanent(format!("{method} {path}: {}", without_url(&e)))
        }
    }

    /// One request with the current credential; the header value sent comes back too.
    async fn send_once(
        &self,
        method: &Method,
        path: &str,
    ) -> Result<(reqwest::Response, Option<HeaderValue>), StepError> {
        let mut req = self.client.request(method.clone(), format!("{}{}", self.base_url, path));
        let mut sent = None;
        if let Some(creds) = &self.auth {
            let (h, v) = creds.header().await?;
            req = req.header(h, v.clone());
            sent = Some(v);
        }
        let resp = req.send().await.map_err(|e| self.send_error(method, path, e))?;
        Ok((resp, sent))
    }

    /// Whether the API answers at all (any status counts), for
    /// `reaper check-config --connect`.
    pub async fn reach(&self) -> Result<String, StepError> {
        let (resp, _) = self.send_once(&Method::GET, "/").await?;
        Ok(format!("answers (HTTP {} to GET /)", resp.status().as_u16()))
    }

    /// Paced and capped; 429 pauses the provider; 2xx, 404 and 410 come back.
    async fn request(&self, method: &Method, path: &str) -> Result<reqwest::Response, StepError> {
        let _permit = self.in_flight.acquire().await.expect("the semaphore is never closed");
        self.wait_for_turn().await;
        let (mut resp, sent) = self.send_once(method, path).await?;
        // An expired token: fetched again once (by one step however many got
        // the 401), and the request made once more before the 401 counts.
        if resp.status() == StatusCode::UNAUTHORIZED {
            if let (Some(creds), Some(sent)) = (&self.auth, sent) {
                if creds.rejected(&sent).await {
                    self.wait_for_turn().await;
                    resp = self.send_once(method, path).await?.0;
                }
            }
        }
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after =
                resp.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(retry_after);
            self.pause(retry_after.unwrap_or(Duration::from_secs(1))).await;
            return Err(StepError::RateLimited { retry_after });
        }
        if status.is_redirection() {
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            // Said in results and logs: without credentials or a query string.
            let location = location
                .map_or_else(|| "nowhere".to_string(), |l| redact_url(l.split(['?', '#']).next().unwrap_or("")));
            let location: String = location.chars().filter(|c| *c != '\0').take(300).collect();
            return Err(StepError::Permanent(format!(
                "{method} {path}: {status} redirects to {location}; reaper does not follow redirects (fix base_url)"
            )));
        }
        if !status.is_success() && status != StatusCode::NOT_FOUND && status != StatusCode::GONE {
            let detail = resp.text().await.unwrap_or_default();
            return Err(classify_status(status, &detail));
        }
        Ok(resp)
    }

    async fn wait_for_turn(&self) {
        let wake = {
            let mut p = self.pacer.lock().await;
            let now = Instant::now();
            let mut at = p.next_slot.max(now);
            if let Some(until) = p.paused_until {
                at = at.max(until);
            }
            if let Some(i) = p.interval {
                p.next_slot = at + i;
            }
            at
        };
        tokio::time::sleep_until(wake).await;
    }

    async fn pause(&self, d: Duration) {
        let mut p = self.pacer.lock().await;
        let until = Instant::now() + d;
        p.paused_until = Some(p.paused_until.map_or(until, |u| u.max(until)));
        tracing::info!(provider = %self.name, pause_ms = d.as_millis() as u64, "rate limited by the API; slowing the whole provider");
    }
}

/// A `Retry-After` in seconds, clamped to [`MAX_RETRY_AFTER`] *before* it
/// becomes a `Duration` (`Duration::from_secs_f64(1e20)` panics, and a panic
/// in an inventory reader once looked like a list that had ended).
fn retry_after(header: &str) -> Option<Duration> {
    let secs = header.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0)?;
    Some(Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64())))
}

fn classify_status(status: StatusCode, body: &str) -> StepError {
    // NUL cannot be stored in PostgreSQL text; an API's body must not be able
    // to make a job's report unwritable.
    let detail: String = body.chars().filter(|c| *c != '\0').take(200).collect();
    match status.as_u16() {
        409 | 423 => StepError::NotYet { status: status.as_u16(), detail },
        500..=599 | 408 => StepError::Transient(format!("{status} {detail}")),
        _ => StepError::Permanent(format!("{status} {detail}")),
    }
}

/// reqwest errors print the URL; ours are built from templates and carry no
/// secrets, but the base URL may, so keep only the cause.
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string().replace('\0', "");
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "");
    }
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// The curl options a generated script passes for this provider's
/// credentials: read from the environment when it runs, never written out.
/// Only an HTTP provider's steps are run by curl.
pub fn curl_credentials(provider: &str, settings: &crate::config::ProviderSettings) -> String {
    let crate::config::ProviderSettings::Http(h) = settings else { return String::new() };
    let mut out = String::new();
    if let Some(a) = &h.auth {
        let var = a.token_env.clone().unwrap_or_else(|| format!("REAPER_{}_TOKEN", provider.to_uppercase()));
        let value = match a.scheme.is_empty() {
            true => format!("${{{var}:?set {var}}}"),
            false => format!("{} ${{{var}:?set {var}}}", a.scheme),
        };
        out.push_str(&format!(" -H \"{}: {value}\"", a.header));
    }
    if has_userinfo(&h.base_url) {
        let var = format!("REAPER_{}_USERINFO", provider.to_uppercase());
        out.push_str(&format!(" -u \"${{{var}:?set {var} to user:password}}\""));
    }
    out
}

/// Whether a URL carries `user[:password]@` before its host.
fn has_userinfo(url: &str) -> bool {
    url.split_once("://").is_some_and(|(_, rest)| rest.split('/').next().unwrap_or("").contains('@'))
}

// ---- Listing, for reconcile ----

/// What an HTTP inventory needs: a GET without placeholders, a key, JSON
/// pointers, and at most one way of finding the next page.
pub fn check_inventory(inv: &InventorySettings) -> Result<(), String> {
    let r = inv.request.as_deref().ok_or("an HTTP inventory needs `request` (\"GET /path\")")?;
    let t = RequestTemplate::parse(r)?;
    if t.method() != Method::GET || r.contains('{') {
        return Err("an HTTP inventory's request is a GET without placeholders".into());
    }
    if inv.key.is_none() {
        return Err("an HTTP inventory needs `key` (a JSON pointer such as \"/name\")".into());
    }
    for p in [Some(&inv.items), inv.key.as_ref(), inv.next.as_ref(), inv.next_url.as_ref(), inv.created_at.as_ref()]
        .into_iter()
        .chain([inv.total.as_ref()])
        .flatten()
        .chain(inv.attributes.values())
    {
        if !p.is_empty() && !p.starts_with('/') {
            return Err(format!("{p:?} is not a JSON pointer (they start with '/')"));
        }
    }
    let ways = [inv.next.is_some(), inv.next_url.is_some(), inv.offset_param.is_some()];
    if ways.iter().filter(|w| **w).count() > 1 {
        return Err(
            "an HTTP inventory pages by one of `next` (a token), `next_url` or `offset_param`, not several".into()
        );
    }
    if inv.offset_param.is_some() && inv.page_size == 0 {
        return Err("page_size must be at least 1".into());
    }
    if inv.total.is_some() && inv.offset_param.is_none() {
        return Err("`total` is read with offset paging (`offset_param`) only".into());
    }
    Ok(())
}

/// How a list says where its next page is.
enum NextPage {
    /// One page is the whole list.
    None,
    /// A token, sent back in a query parameter (`?start=TOKEN`, Vertex's `pageToken`).
    Token,
    /// A URL (IBM VPC's `next.href`), followed only under `base_url`.
    Url,
    /// `?offset=N&limit=M`, until a page comes back empty.
    Offset { param: String },
}

impl NextPage {
    fn of(inv: &InventorySettings) -> NextPage {
        match (&inv.next, &inv.next_url, &inv.offset_param) {
            (Some(_), _, _) => NextPage::Token,
            (_, Some(_), _) => NextPage::Url,
            (_, _, Some(p)) => NextPage::Offset { param: p.clone() },
            _ => NextPage::None,
        }
    }
}

/// `path` with `name=value` added to its query.
fn with_param(path: &str, name: &str, value: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    let value = percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC);
    format!("{path}{sep}{name}={value}")
}

/// More pages than this is a list that does not end (an API handing out a
/// new token every time): the load fails rather than hold the sweep forever.
const MAX_PAGES: usize = 100_000;

impl HttpProvider {
    /// The path (under `base_url`) of a next page an API gave as a URL,
    /// whole or relative. It must be the same list as `first` (the first
    /// request's path and query): the same origin, the same path, only its
    /// query may differ, and a parameter of the first request the URL leaves
    /// out (IBM's `version`) is carried over. Anything else — another scheme,
    /// host or port, another path, credentials in the URL — is refused: the
    /// list request carries our token, and a page of another list would be
    /// taken for the rest of this one.
    fn page_path(&self, href: &str, first: &str) -> Result<String, String> {
        let base = reqwest::Url::parse(&format!("{}/", self.base_url)).map_err(|e| format!("base_url: {e}"))?;
        let next = base.join(href).map_err(|e| format!("the next page {href:?} is not a URL: {e}"))?;
        let same_origin = next.scheme() == base.scheme()
            && next.host_str() == base.host_str()
            && next.port_or_known_default() == base.port_or_known_default();
        let shown = redact_url(href.split(['?', '#']).next().unwrap_or(""));
        if !same_origin || !next.username().is_empty() || next.password().is_some() {
            return Err(format!(
                "the next page {shown:?} is not on {}; reaper follows pages on base_url's origin only",
                redact_url(&self.base_url)
            ));
        }
        let Some(rest) = next.path().strip_prefix(base.path()) else {
            return Err(format!("the next page {shown:?} is outside base_url's path {:?}", base.path()));
        };
        let (first_path, first_query) = first.split_once('?').unwrap_or((first, ""));
        let path = format!("/{rest}");
        if path != first_path {
            return Err(format!("the next page {shown:?} is not the list asked for ({first_path:?})"));
        }
        let mut url = next.query().map_or(path.clone(), |q| format!("{path}?{q}"));
        let given: std::collections::HashSet<String> = next.query_pairs().map(|(k, _)| k.into_owned()).collect();
        for pair in first_query.split('&').filter(|p| !p.is_empty()) {
            let name = pair.split('=').next().unwrap_or_default();
            if !given.contains(name) {
                let sep = if url.contains('?') { '&' } else { '?' };
                url = format!("{url}{sep}{pair}");
            }
        }
        Ok(url)
    }

    pub async fn list(&self, inv: &InventorySettings, strict: bool, mut pages: Pages) {
        let request = inv.request.clone().unwrap_or_default();
        let first = request.split_once(' ').map(|(_, p)| p.trim().to_string()).unwrap_or_default();
        let paging = NextPage::of(inv);
        let mut url = match &paging {
            NextPage::Offset { param } => {
                with_param(&with_param(&first, param, "0"), &inv.limit_param, &inv.page_size.to_string())
            }
            _ => first.clone(),
        };
        let mut seen = std::collections::HashSet::new();
        let (mut offset, mut total, mut first_keys) = (0_u64, None::<u64>, None::<Vec<String>>);
        let mut pages_read = 0_usize;
        loop {
            let page = match self.get_json(&url).await {
                Ok(p) => p,
                Err(e) => return pages.fail(format!("GET {url}: {e}")).await,
            };
            let out = match self.items_of(inv, &page, strict) {
                Ok(out) => out,
                Err(e) => return pages.fail(format!("GET {url}: {e}")).await,
            };
            // Every item of the page moves the offset on, a keyless one too:
            // counting only the kept ones would make the pages overlap.
            let got = page.pointer(&inv.items).and_then(|v| v.as_array()).map_or(0, Vec::len) as u64;
            pages_read += 1;
            if pages_read > MAX_PAGES {
                return pages.fail(format!("GET {url}: more than {MAX_PAGES} pages: a list that does not end")).await;
            }
            // Offset paging: an API that ignores the offset sends page one
            // again and again; one whose total moves has shifted items under
            // our offsets, skipping some.
            if let NextPage::Offset { .. } = paging {
                let total_now = inv.total.as_deref().and_then(|p| page.pointer(p)).and_then(|v| v.as_u64());
                if inv.total.is_some() && total_now.is_none() {
                    return pages.fail(format!("GET {url}: no count at {:?} in the answer", inv.total)).await;
                }
                if total.is_some() && total_now != total {
                    return pages
                        .fail(format!(
                            "GET {url}: the list changed while it was read (total {} then {}): offset paging would skip items",
                            total.unwrap_or(0),
                            total_now.unwrap_or(0)
                        ))
                        .await;
                }
                total = total_now;
                // The same items again, in whatever order: the offset was ignored.
                let mut keys = out.iter().map(|i| i.key.clone()).collect::<Vec<_>>();
                keys.sort();
                if got > 0 && first_keys.as_ref() == Some(&keys) {
                    return pages
                        .fail(format!("GET {url}: the API sent the same page again (does it ignore {:?}?)", url))
                        .await;
                }
                first_keys = Some(keys);
            }
            if !pages.push_page(out).await {
                return;
            }
            let next = match &paging {
                NextPage::None => None,
                NextPage::Token => {
                    let token = inv.next.as_deref().and_then(|p| page.pointer(p)).and_then(json_text);
                    token.filter(|t| !t.is_empty()).map(|t| Ok(with_param(&first, &inv.next_param, &t)))
                }
                NextPage::Url => {
                    let href = inv.next_url.as_deref().and_then(|p| page.pointer(p)).and_then(json_text);
                    href.filter(|h| !h.is_empty()).map(|h| self.page_path(&h, &first))
                }
                NextPage::Offset { param } => {
                    offset += got;
                    (got > 0).then(|| {
                        let p = with_param(&first, param, &offset.to_string());
                        Ok(with_param(&p, &inv.limit_param, &inv.page_size.to_string()))
                    })
                }
            };
            url = match next {
                None => break,
                Some(Err(e)) => return pages.fail(format!("GET {url}: {e}")).await,
                Some(Ok(u)) if !seen.insert(u.clone()) => {
                    let what = match paging {
                        NextPage::Token => "page token leading to",
                        _ => "the next page",
                    };
                    return pages.fail(format!("GET {url}: the API sent {what} {u:?} twice")).await;
                }
                Some(Ok(u)) => u,
            };
        }
        if let Some(t) = total.filter(|t| *t != offset) {
            return pages.fail(format!("the API counted {t} items and listed {offset}")).await;
        }
        pages.finish().await
    }

    /// The items of one page. A truth item without a key fails the load
    /// (`strict`): skipping it would make its counterpart look orphaned.
    fn items_of(&self, inv: &InventorySettings, page: &serde_json::Value, strict: bool) -> Result<Vec<Item>, String> {
        let Some(items) = page.pointer(&inv.items).and_then(|v| v.as_array()) else {
            return Err(format!("no array at {:?} in the answer", inv.items));
        };
        let key = inv.key.clone().unwrap_or_default();
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            let k = it.pointer(&key).and_then(json_text);
            let k = match inv.key_last_segment {
                true => k.and_then(|k| k.rsplit('/').next().map(str::to_string)),
                false => k,
            };
            let Some(k) = k.filter(|k| !k.is_empty()) else {
                if strict {
                    return Err(format!("an item has nothing at {key:?}: it could not be matched"));
                }
                continue;
            };
            let created_at = inv.created_at.as_deref().and_then(|p| it.pointer(p)).and_then(|v| match v {
                serde_json::Value::Number(n) => n.as_f64().and_then(|s| DateTime::from_timestamp(s as i64, 0)),
                other => json_text(other).and_then(|s| parse_time(&s)),
            });
            let attributes = inv
                .attributes
                .iter()
                .filter_map(|(name, p)| it.pointer(p).and_then(json_text).map(|v| (name.clone(), v)))
                .collect();
            out.push(Item { key: k, created_at, attributes });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devtools::sim::{Faults, Sim};
    use tokio_util::sync::CancellationToken;

    /// An HTTP provider on a fresh simulated cloud, with `extra` settings.
    async fn provider(extra: &str) -> (HttpProvider, Sim, CancellationToken) {
        let sim = Sim::new();
        let stop = CancellationToken::new();
        let addr = sim.spawn(0, stop.clone()).await.expect("the simulated cloud listens");
        let toml = format!("[providers.cloud]\ntype = \"http\"\nbase_url = \"http://{addr}\"\n{extra}\n");
        let settings = crate::config::Settings::from_toml(&toml).expect("settings");
        let Some(crate::config::ProviderSettings::Http(h)) = settings.providers.get("cloud") else { unreachable!() };
        (HttpProvider::build("cloud", h).expect("provider"), sim, stop)
    }

    fn vni(i: usize) -> Resource {
        Resource { kind: "vni".into(), id: format!("v{i}"), attributes: BTreeMap::new(), parent: None }
    }

    /// Deletes `n` resources at once and waits for every answer.
    async fn delete_all(p: &HttpProvider, sim: &Sim, n: usize) {
        let t = RequestTemplate::parse("DELETE /v1/vnis/{id}").unwrap();
        for i in 0..n {
            sim.create(&format!("/v1/vnis/v{i}"), &[]);
        }
        let all: Vec<_> = (0..n).map(vni).collect();
        let results = futures_util::future::join_all(all.iter().map(|r| p.delete(&t, r))).await;
        assert!(results.iter().all(|r| matches!(r, Ok(Deleted::Now))), "{results:?}");
    }

    #[tokio::test]
    async fn no_more_requests_are_in_flight_than_max_concurrency() {
        let (p, sim, _stop) = provider("max_concurrency = 3").await;
        sim.set_faults(Faults { latency_ms: 30, ..Faults::default() });
        delete_all(&p, &sim, 12).await;
        assert_eq!(sim.stats().max_in_flight, 3, "at most three at once, and three did run at once");
    }

    #[tokio::test]
    async fn requests_are_spaced_by_rate_per_sec() {
        let (p, sim, _stop) = provider("rate_per_sec = 40").await;
        delete_all(&p, &sim, 8).await;
        let at: Vec<Duration> = sim.timeline().iter().map(|a| a.at).collect();
        for pair in at.windows(2) {
            // 25 ms apart, less a little for the clocks of two tasks.
            assert!(pair[1] - pair[0] >= Duration::from_millis(20), "requests too close: {at:?}");
        }
    }

    #[tokio::test]
    async fn a_429_holds_back_every_request_to_the_provider_for_its_retry_after() {
        let (p, sim, _stop) = provider("max_concurrency = 4").await;
        sim.set_faults(Faults { fail_next: 1, fail_status: 429, retry_after_secs: 0.4, ..Faults::default() });
        let t = RequestTemplate::parse("DELETE /v1/vnis/{id}").unwrap();
        sim.create("/v1/vnis/v0", &[]);
        assert!(matches!(p.delete(&t, &vni(0)).await, Err(StepError::RateLimited { .. })));
        delete_all(&p, &sim, 4).await;
        let timeline = sim.timeline();
        let limited = timeline.iter().find(|a| a.status == 429).expect("one 429").at;
        let next = timeline.iter().filter(|a| a.at > limited).map(|a| a.at).min().expect("the later deletes");
        assert!(next - limited >= Duration::from_millis(350), "a request came {:?} after the 429", next - limited);
    }

    /// Lists `collection` with `inv` (TOML of the inventory) to the end.
    async fn list_all(p: &HttpProvider, inv: &str) -> Result<Vec<Item>, String> {
        use figment::providers::Format;
        let toml = figment::providers::Toml::string(&format!("provider = \"cloud\"\n{inv}"));
        let inv: InventorySettings = figment::Figment::from(toml).extract().expect("inventory");
        check_inventory(&inv)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let read = async {
            let mut out = Vec::new();
            loop {
                match rx.recv().await {
                    Some(crate::providers::listing::Chunk::Page(items)) => out.extend(items),
                    Some(crate::providers::listing::Chunk::End) => return Ok(out),
                    Some(crate::providers::listing::Chunk::Failed(why)) => return Err(why),
                    None => return Err("the lister stopped without saying the list ended".into()),
                }
            }
        };
        let ((), out) = tokio::join!(p.list(&inv, true, Pages::new(tx)), read);
        out
    }

    fn keys(items: &[Item]) -> Vec<&str> {
        items.iter().map(|i| i.key.as_str()).collect()
    }

    /// Five resources under `collection`, listed in `shape`, two a page.
    async fn five(
        shape: crate::devtools::sim::ListShape,
        collection: &str,
        item: impl Fn(u32) -> serde_json::Value,
    ) -> (HttpProvider, Sim, CancellationToken) {
        let (p, sim, stop) = provider("").await;
        sim.set_list_shape(collection, shape, 2);
        for i in 1..=5 {
            sim.create_with(&format!("{collection}/{i}"), item(i));
        }
        (p, sim, stop)
    }

    #[tokio::test]
    async fn a_list_in_one_page_under_data_with_numeric_keys() {
        let (p, _sim, _stop) = five(
            crate::devtools::sim::ListShape::Data,
            "/api2/json/nodes/pve/lxc",
            |i| serde_json::json!({"vmid": 100 + i}),
        )
        .await;
        let items =
            list_all(&p, "request = \"GET /api2/json/nodes/pve/lxc\"\nitems = \"/data\"\nkey = \"/vmid\"").await;
        assert_eq!(keys(&items.unwrap()), ["101", "102", "103", "104", "105"]);
    }

    #[tokio::test]
    async fn a_page_token_is_sent_back_and_a_resource_name_keyed_by_its_last_segment() {
        let base = "/v1/projects/p/locations/l/models";
        let (p, sim, _stop) = five(crate::devtools::sim::ListShape::PageToken, base, |i| {
            serde_json::json!({"name": format!("projects/p/locations/l/models/{i}"), "displayName": format!("m{i}")})
        })
        .await;
        let inv = format!(
            "request = \"GET {base}?pageSize=100\"\nitems = \"/models\"\nkey = \"/name\"\nkey_last_segment = true\n\
             next = \"/nextPageToken\"\nnext_param = \"pageToken\"\nattributes = {{ display_name = \"/displayName\" }}"
        );
        let items = list_all(&p, &inv).await.unwrap();
        assert_eq!(keys(&items), ["1", "2", "3", "4", "5"]);
        assert_eq!(items[4].attributes["display_name"], "m5");
        assert_eq!(sim.requests().len(), 3, "three pages of at most two");
    }

    #[tokio::test]
    async fn a_next_page_given_as_a_whole_url_is_followed() {
        let base = "/v1/bare_metal_servers";
        let (p, sim, _stop) =
            five(crate::devtools::sim::ListShape::NextHref, base, |i| serde_json::json!({"id": format!("0717-{i}")}))
                .await;
        let inv = format!(
            "request = \"GET {base}?version=2024-11-12&limit=50\"\nitems = \"/bare_metal_servers\"\nkey = \"/id\"\nnext_url = \"/next/href\""
        );
        let items = list_all(&p, &inv).await.unwrap();
        assert_eq!(keys(&items), ["0717-1", "0717-2", "0717-3", "0717-4", "0717-5"]);
        assert_eq!(sim.requests().len(), 3);
        // Without the version IBM requires, the list fails: it is not empty.
        let bad = format!(
            "request = \"GET {base}\"\nitems = \"/bare_metal_servers\"\nkey = \"/id\"\nnext_url = \"/next/href\""
        );
        assert!(list_all(&p, &bad).await.unwrap_err().contains("400"));
    }

    #[tokio::test]
    async fn offset_paging_reads_until_an_empty_page_whatever_size_the_api_caps_pages_at() {
        let (p, sim, _stop) = five(
            crate::devtools::sim::ListShape::Offset,
            "/v2/things",
            |i| serde_json::json!({"uid": format!("t{i}")}),
        )
        .await;
        // Asked for 100 a page, the API gives 2: a short page is not the end.
        let inv = "request = \"GET /v2/things\"\nitems = \"/items\"\nkey = \"/uid\"\noffset_param = \"offset\"\ntotal = \"/total\"";
        let items = list_all(&p, inv).await.unwrap();
        assert_eq!(keys(&items), ["t1", "t2", "t3", "t4", "t5"]);
        assert_eq!(sim.requests().len(), 4, "three pages and the empty one that ends the list");
        // An API that ignores the offset would list page one forever.
        let stuck =
            "request = \"GET /v2/things?offset=0\"\nitems = \"/items\"\nkey = \"/uid\"\noffset_param = \"skip\"";
        assert!(list_all(&p, stuck).await.unwrap_err().contains("the same page again"));
    }

    #[tokio::test]
    async fn a_next_page_elsewhere_than_base_url_is_refused() {
        let (p, _sim, _stop) = provider("").await;
        let origin = p.base_url.clone();
        let first = "/v1/x?version=1&limit=2";
        assert_eq!(
            p.page_path(&format!("{origin}/v1/x?start=2&version=1"), first).unwrap(),
            "/v1/x?start=2&version=1&limit=2"
        );
        // IBM's href may leave `version` out: the first request's is carried over.
        assert_eq!(p.page_path("/v1/x?start=2&limit=2", first).unwrap(), "/v1/x?start=2&limit=2&version=1");
        for bad in [
            "https://evil.example/v1/x?start=2".to_string(),
            origin.replace("http://", "https://"),
            origin.replace("http://", "http://user:pw@"),
            format!("{}1/v1/x", origin),
            "//evil.example/v1/x".to_string(),
            // The same origin, another list: its items are not this list's.
            format!("{origin}/v1/vpcs?start=2"),
            "/v1/x/y?start=2".to_string(),
        ] {
            assert!(p.page_path(&bad, first).is_err(), "{bad} was followed");
        }
        // Under a base path, a page outside it is refused too.
        let (sub, _sim2, _stop2) = provider("").await;
        let sub = HttpProvider { base_url: format!("{}/api", sub.base_url), ..sub };
        assert_eq!(sub.page_path(&format!("{}/v1/x", sub.base_url), "/v1/x").unwrap(), "/v1/x");
        assert!(sub.page_path(&format!("{}/v1/x", origin), "/v1/x").is_err());
    }

    #[tokio::test]
    async fn one_way_of_paging_at_a_time() {
        let (p, _sim, _stop) = provider("").await;
        let both = "request = \"GET /v1/x\"\nkey = \"/id\"\nnext = \"/next\"\nnext_url = \"/next/href\"";
        assert!(list_all(&p, both).await.unwrap_err().contains("not several"));
    }

    #[test]
    fn values_are_encoded_so_they_cannot_leave_their_segment() {
        let t = RequestTemplate::parse("DELETE /v1/subnets/{attr.subnet_id}/reserved_ips/{id}").unwrap();
        let mut a = BTreeMap::new();
        a.insert("subnet_id".to_string(), "../admin".to_string());
        assert_eq!(t.render("a b/c?d#e", &a).unwrap(), "/v1/subnets/..%2Fadmin/reserved_ips/a%20b%2Fc%3Fd%23e");
        assert_eq!(t.attributes().collect::<Vec<_>>(), ["subnet_id"]);
    }

    #[test]
    fn values_that_a_url_parser_would_remove_are_refused() {
        let t = RequestTemplate::parse("DELETE /v1/dns_zones/{attr.zone_id}/resource_records/{id}").unwrap();
        let zone = |z: &str| BTreeMap::from([("zone_id".to_string(), z.to_string())]);
        for bad in ["", ".", ".."] {
            assert!(t.render(bad, &zone("z1")).is_err(), "id {bad:?}");
            assert!(t.render("r1", &zone(bad)).is_err(), "zone_id {bad:?}");
        }
        assert_eq!(t.render("...", &zone(".a")).unwrap(), "/v1/dns_zones/.a/resource_records/...");
        assert_eq!(t.render("%2e%2e", &zone("z")).unwrap(), "/v1/dns_zones/z/resource_records/%252e%252e");
        // Values that make a dot segment only together, or with a literal.
        let joined = RequestTemplate::parse("DELETE /v1/{attr.a}{id}/x").unwrap();
        let a = BTreeMap::from([("a".to_string(), ".".to_string())]);
        assert!(joined.render(".", &a).is_err());
        assert_eq!(joined.render("b", &a).unwrap(), "/v1/.b/x");
        let dotted = RequestTemplate::parse("DELETE /v1/.{id}/").unwrap();
        assert!(dotted.render(".", &a).is_err());
        assert_eq!(dotted.render("x", &a).unwrap(), "/v1/.x/");
    }

    #[test]
    fn bad_templates_are_refused() {
        assert!(RequestTemplate::parse("/v1/x/{id}").is_err());
        assert!(RequestTemplate::parse("DELETE v1/x").is_err());
        assert!(RequestTemplate::parse("DELETE /v1/{name}").is_err());
        assert!(RequestTemplate::parse("DELETE /v1/{id").is_err());
        assert!(RequestTemplate::parse("DELETE /v1/{attr.zone/records/{id}").is_err());
        assert!(RequestTemplate::parse("DELET /v1/{id}").is_err());
    }

    #[test]
    fn a_huge_retry_after_is_clamped_not_a_panic() {
        assert_eq!(retry_after("1e20"), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(" 2.5 "), Some(Duration::from_millis(2500)));
        assert_eq!(retry_after("-1"), None);
        assert_eq!(retry_after("NaN"), None);
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn statuses_map_to_retry_classes() {
        assert!(matches!(classify_status(StatusCode::CONFLICT, ""), StepError::NotYet { .. }));
        assert!(matches!(classify_status(StatusCode::BAD_GATEWAY, ""), StepError::Transient(_)));
        assert!(matches!(classify_status(StatusCode::FORBIDDEN, ""), StepError::Permanent(_)));
    }
}
