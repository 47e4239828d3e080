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
use crate::endpoint::{self, Endpoint, Endpoints, TlsSettings};
use crate::error::{Error, Result};
use crate::hosts::{self, Fingerprint, HostsFile};

/// Credentials are read again after a refusal at most this often per registry (credential
/// helpers are programs; a wrong password must not run one per request).
const CREDENTIAL_RELOAD_EVERY: Duration = Duration::from_secs(5);

/// A registry's host folder is looked at for changes at most this often (a few `stat` calls).
const HOSTS_RECHECK_EVERY: Duration = Duration::from_secs(1);

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

    /// One attempt: a mirror that fails sends the request on to the next host at once.
    pub const ONCE: RetryPolicy = RetryPolicy {
        attempts: 1,
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
    /// Credentials that override the Docker config (e.g. from `--username/--password`); they
    /// go to the registry's server only, never to a mirror.
    pub credential: Option<Credential>,
    /// containerd's hosts folder (`/etc/containerd/certs.d`): `REGISTRY/hosts.toml` names the
    /// mirrors tried before the server, and each host's TLS settings (see `hosts.md` of
    /// containerd). Its settings win over the ones above where both speak.
    pub hosts_dir: Option<PathBuf>,
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
            hosts_dir: None,
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
    /// Credentials from the options, for the registry's server.
    explicit: Option<Credential>,
    /// Set by [`Client::set_credential`]: the one registry `explicit` is for (`None`: the
    /// server of whichever registry a request names, as the options' credentials are).
    explicit_for: Option<String>,
    /// When each key's credentials were last read again after a refusal.
    reloaded: HashMap<String, Instant>,
}

/// A registry client shared by every repository and task of a process.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    opts: Arc<ClientOptions>,
    auth: Arc<Mutex<AuthCache>>,
    /// Each registry's hosts, read from its hosts file on first use and again when it changed.
    endpoints: Arc<Mutex<HashMap<String, HostsReading>>>,
}

/// A registry's hosts as last read, and how its host folder looked.
#[derive(Debug)]
struct HostsReading {
    /// The hosts of the last good reading.
    endpoints: Arc<Endpoints>,
    /// The files the last good reading named (CAs, client certificates), watched too.
    named: Vec<PathBuf>,
    /// The folder when last looked at (a bad reading included: it is not read again until
    /// it changes).
    seen: Fingerprint,
    /// When it was last looked at.
    checked: Instant,
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
        let http = endpoint::http_client(&opts, &TlsSettings::of_options(&opts), None)?;
        let cache = AuthCache {
            explicit: opts.credential.clone(),
            ..AuthCache::default()
        };
        Ok(Client {
            http,
            opts: Arc::new(opts),
            auth: Arc::new(Mutex::new(cache)),
            endpoints: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Replaces the credentials of the options ([`ClientOptions::credential`]) on this client
    /// and every clone of it, such as the [`Repository`](crate::Repository) values made from
    /// it, with `credential` for `registry`'s own host alone: they are never sent to a mirror,
    /// to a hosts file's other `server`, nor to any other registry. `None` falls back to the
    /// Docker config. Tokens obtained with the old credentials are forgotten. Returns whether
    /// they changed.
    pub fn set_credential(&self, registry: &str, credential: Option<Credential>) -> bool {
        let mut cache = self
            .auth
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.explicit == credential && cache.explicit_for.as_deref() == Some(registry) {
            return false;
        }
        cache.explicit = credential;
        cache.explicit_for = Some(registry.to_owned());
        cache.tokens.clear();
        true
    }

    /// The hosts of `registry`, in the order they are tried. Its host folder is read on first
    /// use and looked at again at most every [`HOSTS_RECHECK_EVERY`]: a changed, new or removed
    /// `hosts.toml`, folder or certificate file is read again, as containerd reads it for each
    /// pull, so a daemon needs no restart. A first reading that fails is an error; a later one
    /// is logged once and the last good hosts stay in use (a half-written file must not fail
    /// every pull).
    pub(crate) fn endpoints(&self, registry: &str) -> Result<Arc<Endpoints>> {
        let Some(dir) = self.opts.hosts_dir.as_deref() else {
            return self.endpoints_without_folder(registry);
        };
        let mut before: Option<(Arc<Endpoints>, Vec<PathBuf>, Fingerprint)> = None;
        if let Ok(mut map) = self.endpoints.lock()
            && let Some(reading) = map.get_mut(registry)
        {
            if reading.checked.elapsed() < HOSTS_RECHECK_EVERY {
                return Ok(reading.endpoints.clone());
            }
            // Other callers use what is there while this one looks.
            reading.checked = Instant::now();
            before = Some((
                reading.endpoints.clone(),
                reading.named.clone(),
                reading.seen.clone(),
            ));
        }
        let named = before.as_ref().map_or(&[][..], |(_, named, _)| named);
        let now = Fingerprint::take(dir, registry, named);
        if let Some((current, _, seen)) = &before
            && *seen == now
        {
            return Ok(current.clone());
        }
        let previous = before.as_ref().map(|(e, _, _)| &**e);
        // The files it names are stamped before the clients read them: a change after this is
        // seen next time.
        let parsed = hosts::find(dir, registry);
        // Files a reading names are watched even when it fails: creating a CA it names but
        // lacks must bring the new reading in, with no other change to the folder.
        let named_now = parsed
            .as_ref()
            .ok()
            .and_then(Option::as_ref)
            .map(HostsFile::named_files)
            .unwrap_or_default();
        let read = parsed.and_then(|file| {
            let named = named_now.clone();
            let seen = now.clone().with_named(&named);
            let built = endpoint::build(registry, file.as_ref(), &self.opts, &self.http, previous)?;
            Ok((built, named, seen))
        });
        let mut map = self
            .endpoints
            .lock()
            .map_err(|_| Error::Protocol("hosts cache poisoned".into()))?;
        let first = before.is_none();
        let (built, named, seen) = match (read, before) {
            (Ok(read), _) => read,
            (Err(e), None) => return Err(e),
            (Err(e), Some((old, _, _))) => {
                tracing::warn!(
                    registry,
                    error = %e,
                    "registry hosts changed but cannot be used; keeping the last good reading (logged once until they change again)"
                );
                if let Some(reading) = map.get_mut(registry) {
                    reading.seen = now.with_named(&named_now);
                    reading.named = named_now;
                }
                return Ok(old);
            }
        };
        let current = map.get(registry).map(|r| r.endpoints.clone());
        let endpoints = match current {
            // A first reading, and another caller's was first: theirs.
            Some(current) if first => return Ok(current),
            // Touched, or another file of the folder changed: the very same hosts.
            Some(current) if current.same_as(&built) => current,
            current => {
                if let Some(old) = &current {
                    built.carry_over(old);
                    tracing::info!(
                        registry,
                        source = %built.source.as_ref().map_or_else(|| "none".into(), |p| p.display().to_string()),
                        hosts = built.list.len(),
                        "registry hosts changed; using the new reading"
                    );
                }
                Arc::new(built)
            }
        };
        map.insert(
            registry.to_owned(),
            HostsReading {
                endpoints: endpoints.clone(),
                named,
                seen,
                checked: Instant::now(),
            },
        );
        Ok(endpoints)
    }

    /// [`Client::endpoints`] without a hosts folder: the server alone, built once.
    fn endpoints_without_folder(&self, registry: &str) -> Result<Arc<Endpoints>> {
        let mut map = self
            .endpoints
            .lock()
            .map_err(|_| Error::Protocol("hosts cache poisoned".into()))?;
        if let Some(reading) = map.get(registry) {
            return Ok(reading.endpoints.clone());
        }
        let endpoints = Arc::new(endpoint::build(
            registry, None, &self.opts, &self.http, None,
        )?);
        map.insert(
            registry.to_owned(),
            HostsReading {
                endpoints: endpoints.clone(),
                named: Vec::new(),
                seen: Fingerprint::default(),
                checked: Instant::now(),
            },
        );
        Ok(endpoints)
    }

    /// The registry's server (its hosts file's `server`, else the registry itself).
    pub(crate) fn server(&self, registry: &str) -> Result<Arc<Endpoint>> {
        self.endpoints(registry)?
            .server()
            .cloned()
            .ok_or_else(|| Error::Protocol(format!("no server for {registry}")))
    }

    /// The options the client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// `https://REGISTRY` or `http://REGISTRY`: the registry's own server as the options name it
    /// (a hosts file may name another; requests go to the hosts it lists).
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

    /// The credentials for `key` (a registry, or a mirror's host); `server`: the registry's own
    /// server, which the options' explicit credentials are for.
    fn credential(&self, key: &str, server: bool) -> Result<Option<Credential>> {
        {
            let cache = self
                .auth
                .lock()
                .map_err(|_| Error::Protocol("auth cache poisoned".into()))?;
            if server
                && cache.explicit_for.as_deref().is_none_or(|r| r == key)
                && let Some(c) = &cache.explicit
            {
                return Ok(Some(c.clone()));
            }
            if let Some(c) = cache.credentials.get(key) {
                return Ok(c.clone());
            }
        }
        let found = credentials::lookup(key)?;
        if let Ok(mut cache) = self.auth.lock() {
            cache.credentials.insert(key.to_owned(), found.clone());
        }
        Ok(found)
    }

    /// After a refusal: reads `key`'s credentials again (Docker config, helpers), at most every
    /// [`CREDENTIAL_RELOAD_EVERY`]. True when they changed; its tokens are then forgotten.
    fn reload_credential(&self, key: &str, server: bool) -> Result<bool> {
        {
            let mut cache = self
                .auth
                .lock()
                .map_err(|_| Error::Protocol("auth cache poisoned".into()))?;
            if server
                && cache.explicit.is_some()
                && cache.explicit_for.as_deref().is_none_or(|r| r == key)
            {
                return Ok(false);
            }
            if cache
                .reloaded
                .get(key)
                .is_some_and(|at| at.elapsed() < CREDENTIAL_RELOAD_EVERY)
            {
                return Ok(false);
            }
            cache.reloaded.insert(key.to_owned(), Instant::now());
        }
        let found = credentials::lookup(key)?;
        let mut cache = self
            .auth
            .lock()
            .map_err(|_| Error::Protocol("auth cache poisoned".into()))?;
        let before = cache.credentials.insert(key.to_owned(), found.clone());
        let changed = before.flatten() != found;
        if changed {
            cache.tokens.retain(|(k, _), _| k != key);
            tracing::info!(
                registry = key,
                "credentials changed since they were read; using the new ones"
            );
        }
        Ok(changed)
    }

    fn cached_authorization(&self, ep: &Endpoint, scope: &Scope) -> Result<Option<String>> {
        let key = ep.auth_key.as_str();
        let cache = self
            .auth
            .lock()
            .map_err(|_| Error::Protocol("auth cache poisoned".into()))?;
        match cache.challenges.get(key) {
            None => Ok(None),
            Some(Challenge::Basic) => {
                drop(cache);
                Ok(self.credential(key, ep.own_registry)?.map(|c| {
                    format!(
                        "Basic {}",
                        STANDARD.encode(format!("{}:{}", c.username, c.secret))
                    )
                }))
            }
            Some(Challenge::Bearer { .. }) => Ok(cache
                .tokens
                .get(&(key.to_owned(), scope.0.clone()))
                .map(|t| format!("Bearer {t}"))),
        }
    }

    /// Answers a 401: remembers the challenge and, for bearer, fetches a token for `scope`.
    /// Credentials the token service refuses are read again once (they may have changed).
    async fn authenticate(&self, ep: &Endpoint, scope: &Scope, header: Option<&str>) -> Result<()> {
        let key = ep.auth_key.as_str();
        let challenge = header
            .and_then(parse_challenge)
            .ok_or_else(|| Error::Unauthorized {
                registry: key.to_owned(),
                reason: "the registry sent no usable WWW-Authenticate challenge".into(),
            })?;
        if let Ok(mut cache) = self.auth.lock() {
            cache.challenges.insert(key.to_owned(), challenge.clone());
        }
        let Challenge::Bearer { realm, service } = challenge else {
            if self.credential(key, ep.own_registry)?.is_none()
                && !self.reload_credential(key, ep.own_registry)?
            {
                return Err(Error::Unauthorized {
                    registry: key.to_owned(),
                    reason: "credentials required; run `modelpack login`".into(),
                });
            }
            return Ok(());
        };
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(s) = &service {
            query.push(("service", s.clone()));
        }
        if !scope.0.is_empty() {
            query.push(("scope", scope.0.clone()));
        }
        let mut reloaded = false;
        let resp = loop {
            let credential = self.credential(key, ep.own_registry)?;
            let request = match &credential {
                Some(c) if c.identity_token => {
                    let mut form = query.clone();
                    form.push(("grant_type", "refresh_token".into()));
                    form.push(("refresh_token", c.secret.clone()));
                    form.push(("client_id", "modelpack".into()));
                    ep.http.post(&realm).form(&form)
                }
                Some(c) => ep
                    .http
                    .get(&realm)
                    .query(&query)
                    .basic_auth(&c.username, Some(&c.secret)),
                None => ep.http.get(&realm).query(&query),
            };
            let resp = request.send().await.map_err(|error| Error::Http {
                method: "GET".into(),
                url: display_url(&realm),
                error,
            })?;
            let refused =
                resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN;
            if refused && !reloaded && self.reload_credential(key, ep.own_registry)? {
                reloaded = true;
                continue;
            }
            if refused {
                return Err(Error::Unauthorized {
                    registry: key.to_owned(),
                    reason: format!(
                        "the token service refused the credentials ({})",
                        resp.status()
                    ),
                });
            }
            break resp;
        };
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
                .insert((key.to_owned(), scope.0.clone()), token.to_owned());
        }
        Ok(())
    }

    /// Sends a request to `registry`'s server, built by `build` (called again for each
    /// attempt), with auth and retries. Returns the response when its status is a success or
    /// one of `accept`.
    pub async fn send(
        &self,
        registry: &str,
        scope: &Scope,
        method: Method,
        url: &str,
        accept: &[u16],
        build: &(dyn Fn(RequestBuilder) -> Result<RequestBuilder> + Send + Sync),
    ) -> Result<Response> {
        let server = self.server(registry)?;
        self.send_on(&server, scope, method, url, accept, build, self.opts.retry)
            .await
    }

    /// [`Client::send`] to one host, with `policy`'s retries. A refusal (401, 403) after
    /// authenticating reads the credentials again once, in case they changed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send_on(
        &self,
        ep: &Endpoint,
        scope: &Scope,
        method: Method,
        url: &str,
        accept: &[u16],
        build: &(dyn Fn(RequestBuilder) -> Result<RequestBuilder> + Send + Sync),
        policy: RetryPolicy,
    ) -> Result<Response> {
        let started = Instant::now();
        let mut attempt = 0u32;
        let mut authenticated = false;
        let mut reloaded = false;
        loop {
            attempt += 1;
            let mut rb = build(ep.http.request(method.clone(), url))?;
            if !ep.headers.is_empty() {
                rb = rb.headers(ep.headers.clone());
            }
            if let Some(auth) = self.cached_authorization(ep, scope)? {
                rb = rb.header(AUTHORIZATION, auth);
            }
            let outcome = rb.send().await;
            let error = match outcome {
                Ok(resp)
                    if (resp.status() == StatusCode::UNAUTHORIZED
                        || resp.status() == StatusCode::FORBIDDEN)
                        && !accept.contains(&resp.status().as_u16()) =>
                {
                    let status = resp.status();
                    let header = resp
                        .headers()
                        .get(WWW_AUTHENTICATE)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_owned);
                    if status == StatusCode::UNAUTHORIZED && !authenticated {
                        authenticated = true;
                        attempt -= 1;
                        self.authenticate(ep, scope, header.as_deref()).await?;
                        continue;
                    }
                    // Refused with what we hold: the credentials may have been rotated since
                    // they were read. The next 401 fetches a token with the new ones.
                    if !reloaded && self.reload_credential(&ep.auth_key, ep.own_registry)? {
                        reloaded = true;
                        authenticated = false;
                        attempt -= 1;
                        continue;
                    }
                    if status == StatusCode::UNAUTHORIZED {
                        return Err(Error::Unauthorized {
                            registry: ep.auth_key.clone(),
                            reason: "the registry refused the credentials (401)".into(),
                        });
                    }
                    return Err(status_error(&method, url, resp).await);
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
            if !err.is_retryable() || policy.attempts <= 1 {
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

    /// Checks that the registry's server answers `/v2/` with these credentials.
    pub async fn ping(&self, registry: &str) -> Result<()> {
        let server = self.server(registry)?;
        let url = format!("{}/", server.root);
        self.send_on(
            &server,
            &Scope::registry(),
            Method::GET,
            &url,
            &[],
            &Ok,
            self.opts.retry,
        )
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
