//! The HTTP side: one `reqwest` client per process, the distribution auth flow (anonymous, basic,
//! bearer tokens with scopes, identity tokens), and retries with capped exponential backoff,
//! jitter, `Retry-After` and an overall deadline.
//!
//! Why reqwest and not `oci-client`: we need uploads streamed from a file at an offset without
//! buffering a blob, ranged reads with our own fallback when a server ignores `Range`, chunked
//! uploads resumed from the offset the registry reports, and per-request control of retries.
//! `oci-client` buffers blobs in memory on push and hides the request loop.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::header::{AUTHORIZATION, HeaderMap, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};

use crate::credentials::{self, Credential};
use crate::error::{Error, Result};

/// How hard to retry.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// First backoff.
    pub base: Duration,
    /// Largest backoff.
    pub cap: Duration,
    /// Give up once this much time has passed since the first attempt.
    pub deadline: Duration,
}

impl RetryPolicy {
    /// Six attempts, 200 ms doubling to 10 s, within two minutes.
    pub const STANDARD: RetryPolicy = RetryPolicy {
        attempts: 6,
        base: Duration::from_millis(200),
        cap: Duration::from_secs(10),
        deadline: Duration::from_secs(120),
    };
}

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Speak HTTP instead of HTTPS.
    pub plain_http: bool,
    /// Do not verify TLS certificates.
    pub insecure: bool,
    /// Extra CA certificate (PEM) to trust.
    pub ca_file: Option<PathBuf>,
    /// Time allowed to connect and to wait for each read of a response.
    pub io_timeout: Duration,
    /// Retry policy for every request.
    pub retry: RetryPolicy,
    /// Credentials that override the Docker config (e.g. from `--username/--password`).
    pub credential: Option<Credential>,
}

impl ClientOptions {
    /// HTTPS, verified, standard retries, credentials from the Docker config.
    pub fn new() -> ClientOptions {
        ClientOptions {
            plain_http: false,
            insecure: false,
            ca_file: None,
            io_timeout: Duration::from_secs(30),
            retry: RetryPolicy::STANDARD,
            credential: None,
        }
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Debug, Default)]
struct AuthCache {
    challenges: HashMap<String, Challenge>,
    tokens: HashMap<(String, String), String>,
    credentials: HashMap<String, Option<Credential>>,
}

/// A registry client shared by every repository and task of a process.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    opts: Arc<ClientOptions>,
    auth: Arc<Mutex<AuthCache>>,
}

/// What a request needs access to, as a bearer-token scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope(pub String);

impl Scope {
    /// `repository:NAME:pull`.
    pub fn pull(repository: &str) -> Scope {
        Scope(format!("repository:{repository}:pull"))
    }

    /// `repository:NAME:pull,push`.
    pub fn push(repository: &str) -> Scope {
        Scope(format!("repository:{repository}:pull,push"))
    }

    /// `repository:NAME:delete` with pull.
    pub fn delete(repository: &str) -> Scope {
        Scope(format!("repository:{repository}:pull,delete"))
    }

    /// No repository (the `/v2/` ping).
    pub fn registry() -> Scope {
        Scope(String::new())
    }
}

fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    // key="value", key="value" (values may contain commas inside quotes)
    let mut rest = params;
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key.trim().trim_start_matches(',').trim();
        let (value, next) = if let Some(stripped) = after.strip_prefix('"') {
            match stripped.find('"') {
                Some(end) => (&stripped[..end], &stripped[end + 1..]),
                None => (stripped, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        match key.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value.to_owned()),
            "service" => service = Some(value.to_owned()),
            _ => {}
        }
        rest = next.trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: realm?,
        service,
    })
}

/// Parses `Retry-After` given in seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(300)))
}

fn jitter(d: Duration) -> Duration {
    // Up to +25%, from the clock's low bits: enough to spread retries, no RNG dependency.
    let nanos = Instant::now().elapsed().subsec_nanos() ^ std::process::id();
    d + d.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

/// Strips the query (it may hold upload state or tokens) from a URL for messages.
pub(crate) fn display_url(url: &str) -> String {
    url.split('?').next().unwrap_or(url).to_owned()
}

async fn status_error(method: &Method, url: &str, resp: Response) -> Error {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let (code, message) = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            let first = v["errors"].get(0)?.clone();
            Some((
                first["code"].as_str().map(str::to_owned),
                first["message"].as_str().unwrap_or_default().to_owned(),
            ))
        })
        .unwrap_or((None, String::new()));
    Error::Status {
        method: method.to_string(),
        url: display_url(url),
        status,
        code,
        message,
    }
}

impl Client {
    /// Builds a client.
    pub fn new(opts: ClientOptions) -> Result<Client> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("modelpack/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(opts.io_timeout)
            .read_timeout(opts.io_timeout)
            .pool_max_idle_per_host(32)
            .redirect(reqwest::redirect::Policy::limited(5));
        if opts.insecure {
            builder = builder.danger_accept_invalid_certs(true);
        }
        if let Some(ca) = &opts.ca_file {
            let pem = std::fs::read(ca).map_err(|e| Error::Io {
                context: format!("reading CA file {}", ca.display()),
                source: e,
            })?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| Error::Protocol(format!("CA file {}: {e}", ca.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| Error::Protocol(format!("cannot build the HTTP client: {e}")))?;
        let mut cache = AuthCache::default();
        if let Some(c) = &opts.credential {
            // Explicit credentials apply to every registry this client talks to.
            cache.credentials.insert(String::from("*"), Some(c.clone()));
        }
        Ok(Client {
            http,
            opts: Arc::new(opts),
            auth: Arc::new(Mutex::new(cache)),
        })
    }

    /// The options the client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// `https://REGISTRY` or `http://REGISTRY`.
    pub fn base_url(&self, registry: &str) -> String {
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let scheme = if self.opts.plain_http {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}")
    }

    fn credential(&self, registry: &str) -> Result<Option<Credential>> {
        {
            let cache = self
                .auth
                .lock()
                .map_err(|_| Error::Protocol("auth cache poisoned".into()))?;
            if let Some(c) = cache.credentials.get("*") {
                return Ok(c.clone());
            }
            if let Some(c) = cache.credentials.get(registry) {
                return Ok(c.clone());
            }
        }
        let found = credentials::lookup(registry)?;
        if let Ok(mut cache) = self.auth.lock() {
            cache.credentials.insert(registry.to_owned(), found.clone());
        }
        Ok(found)
    }

    fn cached_authorization(&self, registry: &str, scope: &Scope) -> Result<Option<String>> {
        let cache = self
            .auth
            .lock()
            .map_err(|_| Error::Protocol("auth cache poisoned".into()))?;
        match cache.challenges.get(registry) {
            None => Ok(None),
            Some(Challenge::Basic) => {
                drop(cache);
                Ok(self.credential(registry)?.map(|c| {
                    format!(
                        "Basic {}",
                        STANDARD.encode(format!("{}:{}", c.username, c.secret))
                    )
                }))
            }
            Some(Challenge::Bearer { .. }) => Ok(cache
                .tokens
                .get(&(registry.to_owned(), scope.0.clone()))
                .map(|t| format!("Bearer {t}"))),
        }
    }

    /// Answers a 401: remembers the challenge and, for bearer, fetches a token for `scope`.
    async fn authenticate(
        &self,
        registry: &str,
        scope: &Scope,
        header: Option<&str>,
    ) -> Result<()> {
        let challenge = header
            .and_then(parse_challenge)
            .ok_or_else(|| Error::Unauthorized {
                registry: registry.to_owned(),
                reason: "the registry sent no usable WWW-Authenticate challenge".into(),
            })?;
        if let Ok(mut cache) = self.auth.lock() {
            cache
                .challenges
                .insert(registry.to_owned(), challenge.clone());
        }
        let Challenge::Bearer { realm, service } = challenge else {
            if self.credential(registry)?.is_none() {
                return Err(Error::Unauthorized {
                    registry: registry.to_owned(),
                    reason: "credentials required; run `modelpack login`".into(),
                });
            }
            return Ok(());
        };
        let credential = self.credential(registry)?;
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(s) = &service {
            query.push(("service", s.clone()));
        }
        if !scope.0.is_empty() {
            query.push(("scope", scope.0.clone()));
        }
        let request = match &credential {
            Some(c) if c.identity_token => {
                let mut form = query.clone();
                form.push(("grant_type", "refresh_token".into()));
                form.push(("refresh_token", c.secret.clone()));
                form.push(("client_id", "modelpack".into()));
                self.http.post(&realm).form(&form)
            }
            Some(c) => self
                .http
                .get(&realm)
                .query(&query)
                .basic_auth(&c.username, Some(&c.secret)),
            None => self.http.get(&realm).query(&query),
        };
        let resp = request.send().await.map_err(|error| Error::Http {
            method: "GET".into(),
            url: display_url(&realm),
            error,
        })?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(Error::Unauthorized {
                registry: registry.to_owned(),
                reason: format!(
                    "the token service refused the credentials ({})",
                    resp.status()
                ),
            });
        }
        if !resp.status().is_success() {
            return Err(status_error(&Method::GET, &realm, resp).await);
        }
        let bytes = crate::repository::read_capped(resp, 1 << 20).await?;
        let body: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Protocol(format!("token response from {}: {e}", display_url(&realm)))
        })?;
        let token = body["token"]
            .as_str()
            .or(body["access_token"].as_str())
            .ok_or_else(|| Error::Protocol("token response has no token".into()))?;
        if let Ok(mut cache) = self.auth.lock() {
            cache
                .tokens
                .insert((registry.to_owned(), scope.0.clone()), token.to_owned());
        }
        Ok(())
    }

    /// Sends a request built by `build` (called again for each attempt), with auth and retries.
    /// Returns the response when its status is a success or one of `accept`.
    pub async fn send(
        &self,
        registry: &str,
        scope: &Scope,
        method: Method,
        url: &str,
        accept: &[u16],
        build: &(dyn Fn(RequestBuilder) -> Result<RequestBuilder> + Send + Sync),
    ) -> Result<Response> {
        let policy = self.opts.retry;
        let started = Instant::now();
        let mut attempt = 0u32;
        let mut authenticated = false;
        loop {
            attempt += 1;
            let mut rb = build(self.http.request(method.clone(), url))?;
            if let Some(auth) = self.cached_authorization(registry, scope)? {
                rb = rb.header(AUTHORIZATION, auth);
            }
            let outcome = rb.send().await;
            let error = match outcome {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !authenticated => {
                    authenticated = true;
                    attempt -= 1;
                    let header = resp
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_owned);
                    self.authenticate(registry, scope, header.as_deref())
                        .await?;
                    continue;
                }
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED => {
                    return Err(Error::Unauthorized {
                        registry: registry.to_owned(),
                        reason: "the registry refused the credentials (401)".into(),
                    });
                }
                Ok(resp)
                    if resp.status().is_success() || accept.contains(&resp.status().as_u16()) =>
                {
                    return Ok(resp);
                }
                Ok(resp) => {
                    let wait = retry_after(resp.headers());
                    let err = status_error(&method, url, resp).await;
                    (err, wait)
                }
                Err(error) => (
                    Error::Http {
                        method: method.to_string(),
                        url: display_url(url),
                        error,
                    },
                    None,
                ),
            };
            let (err, retry_after) = error;
            if !err.is_retryable() {
                return Err(err);
            }
            let backoff = retry_after.unwrap_or_else(|| {
                jitter(
                    policy
                        .base
                        .saturating_mul(1u32 << (attempt - 1).min(16))
                        .min(policy.cap),
                )
            });
            if attempt >= policy.attempts || started.elapsed() + backoff > policy.deadline {
                return Err(Error::GaveUp {
                    what: format!("{method} {}", display_url(url)),
                    attempts: attempt,
                    elapsed: started.elapsed(),
                    last: Box::new(err),
                });
            }
            tracing::debug!(attempt, ?backoff, error = %err, "retrying");
            tokio::time::sleep(backoff).await;
        }
    }

    /// Checks that the registry answers `/v2/` with these credentials.
    pub async fn ping(&self, registry: &str) -> Result<()> {
        let url = format!("{}/v2/", self.base_url(registry));
        self.send(registry, &Scope::registry(), Method::GET, &url, &[], &Ok)
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        match parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        ) {
            Some(Challenge::Bearer { realm, service }) => {
                assert_eq!(realm, "https://auth.example/token");
                assert_eq!(service.as_deref(), Some("registry.example"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        ));
        assert!(parse_challenge("Digest foo").is_none());
    }
}
