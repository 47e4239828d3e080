//! The hosts a registry is reached through, in the order they are tried: the mirrors of its
//! hosts file, then its server. Each [`Endpoint`] has its own HTTP client (its TLS settings),
//! capabilities, API root and headers; [`Endpoints`] remembers which mirrors failed (a short
//! cool-down after a connection failure, and for good, per blob, after wrong bytes), logs each
//! switch once and counts it in [`mirror_fallbacks`].
//!
//! Mirrors are an optimisation, never a risk: every byte is verified by the caller against
//! digests from a manifest resolved at a host allowed to resolve, and a mirror that fails in any
//! way only sends the request on to the next host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modelpack_spec::Digest;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::client::ClientOptions;
use crate::error::{Error, Result};
use crate::hosts::{self, HostSettings, HostUrl, HostsFile, Stamp, stamp};

/// Requests a mirror lost because it failed, over the whole process.
static MIRROR_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// How many requests moved from a mirror to the next host (a failure, a timeout, an error
/// status, a missing blob or bytes that failed verification), since the process started.
pub fn mirror_fallbacks() -> u64 {
    MIRROR_FALLBACKS.load(Ordering::Relaxed)
}

/// How long a mirror that could not be reached is skipped before it is tried again.
const COOL_DOWN: Duration = Duration::from_secs(10);

/// Blobs whose mirror bookkeeping is kept (bounded: past it, start afresh).
const TRACKED_BLOBS: usize = 4096;

/// One host requests can go to.
pub(crate) struct Endpoint {
    /// `scheme://host[:port]`.
    pub base: String,
    /// `base` with the API root (`/v2` or an overridden path).
    pub root: String,
    /// The key for credentials and tokens: the registry's name for its server, the host for a
    /// mirror.
    pub auth_key: String,
    /// True for the host listed last, the `server` of the hosts file (the registry itself unless
    /// the file names another).
    pub server: bool,
    /// True when this host is the registry itself (whatever its place in the list): only then
    /// do the registry's credentials, and those given on the command line, go to it.
    pub own_registry: bool,
    /// `hosts::PULL | RESOLVE | PUSH` bits.
    pub caps: u8,
    /// `?ns=REGISTRY` for hosts other than the registry, as containerd adds.
    pub ns: Option<String>,
    /// Its HTTP client.
    pub http: reqwest::Client,
    /// Headers of its `[header]` table.
    pub headers: HeaderMap,
    /// Set while it is failing (so the switch is logged once).
    failing: AtomicBool,
    /// Set for good once it served wrong bytes: its later answers do not count as a recovery.
    served_wrong: AtomicBool,
    /// Skipped until then after a connection failure.
    down_until: Mutex<Option<Instant>>,
    /// What it was built from: a re-read hosts file that describes it alike keeps it.
    origin: Origin,
    /// The files its HTTP client was built from, as they were then.
    files: Vec<(PathBuf, Option<Stamp>)>,
}

/// What an [`Endpoint`] is built from.
#[derive(Debug, Clone, PartialEq)]
struct Origin {
    url: HostUrl,
    settings: HostSettings,
    tls: TlsSettings,
    server: bool,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Headers may carry secrets: never shown.
        f.debug_struct("Endpoint")
            .field("root", &self.root)
            .field("server", &self.server)
            .field("own_registry", &self.own_registry)
            .field("caps", &self.caps)
            .finish()
    }
}

impl Endpoint {
    /// True when a new reading describes this host exactly as before and the files its client
    /// was built from are unchanged: it is kept, with its connections and its state.
    fn unchanged(&self, origin: &Origin) -> bool {
        self.origin == *origin && self.files.iter().all(|(path, was)| stamp(path) == *was)
    }

    /// True while it is cooling down after a connection failure.
    fn cooling(&self) -> bool {
        self.down_until
            .lock()
            .ok()
            .and_then(|d| *d)
            .is_some_and(|until| Instant::now() < until)
    }
}

/// The hosts of one registry, in the order they are tried.
///
/// When the hosts file is read again after an edit ([`crate::Client`] looks for changes at most
/// once a second), a host the new reading describes exactly as before (same URL, settings and
/// unchanged certificate files) is the same [`Endpoint`]: its connections, its cool-down and
/// its logged-once state stay. A host whose settings changed starts afresh (the edit may be the
/// fix). What the blobs' bookkeeping says of a host (bytes it served, blobs it may not serve
/// again because their bytes failed verification) follows the host's URL into the new reading:
/// wrong bytes are about what the host serves, not how it is reached. The fallback count is
/// process-wide and never reset.
#[derive(Debug)]
pub(crate) struct Endpoints {
    /// Mirrors in file order, the server last.
    pub list: Vec<Arc<Endpoint>>,
    /// The hosts file they came from, for messages.
    pub source: Option<PathBuf>,
    registry: String,
    /// Per blob: the mirrors (bit = index in `list`) that served bytes of it.
    served: Mutex<HashMap<Digest, u64>>,
    /// Per blob: the mirrors that served bytes of it that failed verification.
    banned: Mutex<HashMap<Digest, u64>>,
}

/// What a request moving off a mirror was caused by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No connection, a timeout, a cut body: skip the host for a while.
    Unreachable,
    /// An error status or a missing object: this request only.
    Answer,
    /// Bytes that failed verification: never for that blob again.
    WrongBytes,
}

fn bit(index: usize) -> u64 {
    1u64 << index.min(63)
}

impl Endpoints {
    /// The hosts that may do `cap`, in order: mirrors that served wrong bytes of `digest` are
    /// left out, and mirrors cooling down after a failure unless nothing else is left.
    pub fn candidates(&self, cap: u8, digest: Option<&Digest>) -> Result<Vec<Arc<Endpoint>>> {
        let banned = digest
            .and_then(|d| self.banned.lock().ok().and_then(|b| b.get(d).copied()))
            .unwrap_or(0);
        let able: Vec<Arc<Endpoint>> = self
            .list
            .iter()
            .enumerate()
            .filter(|(i, e)| e.caps & cap != 0 && banned & bit(*i) == 0)
            .map(|(_, e)| e.clone())
            .collect();
        let Some(last) = able.last().cloned() else {
            let what = match cap {
                hosts::PUSH => "push to",
                hosts::RESOLVE => "resolve tags of",
                _ => "pull from",
            };
            return Err(match &self.source {
                Some(path) => Error::HostsFile {
                    path: path.clone(),
                    reason: format!("no host may {what} {}", self.registry),
                },
                None => Error::Protocol(format!("no host may {what} {}", self.registry)),
            });
        };
        let mut chosen: Vec<Arc<Endpoint>> = able
            .into_iter()
            .filter(|e| Arc::ptr_eq(e, &last) || !e.cooling())
            .collect();
        if chosen.is_empty() {
            chosen.push(last);
        }
        Ok(chosen)
    }

    /// Where `ep` is in the list; a host of an earlier reading (a body opened before the file
    /// was read again) is found by its URL.
    fn index(&self, ep: &Endpoint) -> Option<usize> {
        self.list
            .iter()
            .position(|e| std::ptr::eq(&**e, ep))
            .or_else(|| self.list.iter().position(|e| e.root == ep.root))
    }

    /// True when `other` is this very list of hosts (each the same [`Endpoint`]) from the same
    /// file.
    pub fn same_as(&self, other: &Endpoints) -> bool {
        self.source == other.source
            && self.list.len() == other.list.len()
            && self
                .list
                .iter()
                .zip(&other.list)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }

    /// Takes over the per-blob bookkeeping of `old` (an earlier reading), host by host URL.
    pub fn carry_over(&self, old: &Endpoints) {
        // Old bit -> new bits: the hosts of the new list with the same URL.
        let map: Vec<u64> = old
            .list
            .iter()
            .map(|o| {
                self.list
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| n.root == o.root && !n.server)
                    .fold(0, |m, (j, _)| m | bit(j))
            })
            .collect();
        let remap = |mask: u64| {
            map.iter()
                .enumerate()
                .filter(|(i, _)| mask & bit(*i) != 0)
                .fold(0, |m, (_, new)| m | new)
        };
        for (from, to) in [(&old.served, &self.served), (&old.banned, &self.banned)] {
            let (Ok(from), Ok(mut to)) = (from.lock(), to.lock()) else {
                continue;
            };
            for (digest, mask) in from.iter() {
                let mask = remap(*mask);
                if mask != 0 {
                    *to.entry(digest.clone()).or_default() |= mask;
                }
            }
        }
    }

    /// Notes that `ep` served bytes of `digest` (so a failed verification can be pinned on it).
    pub fn note_served(&self, digest: &Digest, ep: &Endpoint) {
        if ep.server {
            return;
        }
        let Some(i) = self.index(ep) else { return };
        if let Ok(mut served) = self.served.lock() {
            if served.len() >= TRACKED_BLOBS && !served.contains_key(digest) {
                served.clear();
            }
            *served.entry(digest.clone()).or_default() |= bit(i);
        }
    }

    /// Bytes of `digest` failed verification: every mirror that served some is not asked for it
    /// again. True when one was (so a new attempt goes elsewhere).
    pub fn distrust(&self, digest: &Digest) -> bool {
        let mask = self
            .served
            .lock()
            .ok()
            .and_then(|mut s| s.remove(digest))
            .unwrap_or(0);
        if mask == 0 {
            return false;
        }
        if let Ok(mut banned) = self.banned.lock() {
            if banned.len() >= TRACKED_BLOBS && !banned.contains_key(digest) {
                banned.clear();
            }
            *banned.entry(digest.clone()).or_default() |= mask;
        }
        for (i, ep) in self.list.iter().enumerate() {
            if mask & bit(i) != 0 {
                self.failed(
                    ep,
                    Failure::WrongBytes,
                    &format!("bytes of {digest} failed verification"),
                );
            }
        }
        true
    }

    /// Bans `ep` for `digest` at once (a manifest by digest that did not match, a wrong answer
    /// to a blob GET), for `reason`.
    pub fn ban(&self, digest: &Digest, ep: &Endpoint, reason: &str) {
        let Some(i) = self.index(ep) else { return };
        if let Ok(mut banned) = self.banned.lock() {
            if banned.len() >= TRACKED_BLOBS && !banned.contains_key(digest) {
                banned.clear();
            }
            *banned.entry(digest.clone()).or_default() |= bit(i);
        }
        self.failed(ep, Failure::WrongBytes, reason);
    }

    /// A request left `ep` for the next host: counted, logged once per outage.
    pub fn failed(&self, ep: &Endpoint, failure: Failure, reason: &str) {
        MIRROR_FALLBACKS.fetch_add(1, Ordering::Relaxed);
        if failure == Failure::WrongBytes {
            ep.served_wrong.store(true, Ordering::SeqCst);
        }
        if failure == Failure::Unreachable
            && let Ok(mut until) = ep.down_until.lock()
        {
            *until = Some(Instant::now() + COOL_DOWN);
        }
        if !ep.failing.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                registry = %self.registry,
                mirror = %ep.root,
                reason,
                "registry mirror failed; using the next host (logged once until it serves again)"
            );
        } else {
            tracing::debug!(registry = %self.registry, mirror = %ep.root, reason, "registry mirror skipped");
        }
    }

    /// `ep` answered: a failing mirror is back (unless it once served wrong bytes).
    pub fn succeeded(&self, ep: &Endpoint) {
        if !ep.served_wrong.load(Ordering::SeqCst) && ep.failing.swap(false, Ordering::SeqCst) {
            tracing::info!(registry = %self.registry, mirror = %ep.root, "registry mirror serves again");
        }
    }

    /// The server (the last host).
    pub fn server(&self) -> Option<&Arc<Endpoint>> {
        self.list.iter().rev().find(|e| e.server)
    }
}

/// Reads a file a hosts file (or a flag) names.
fn read(path: &Path, source: Option<&Path>) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| match source {
        Some(file) => Error::HostsFile {
            path: file.to_owned(),
            reason: format!("cannot read {}: {e}", path.display()),
        },
        None => Error::Io {
            context: format!("reading {}", path.display()),
            source: e,
        },
    })
}

/// An HTTP client with the settings every request of ours uses.
pub(crate) fn http_client(
    opts: &ClientOptions,
    tls: &TlsSettings,
    source: Option<&Path>,
) -> Result<reqwest::Client> {
    let problem = |what: String| match source {
        Some(file) => Error::HostsFile {
            path: file.to_owned(),
            reason: what,
        },
        None => Error::Protocol(what),
    };
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("modelpack/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(tls.dial_timeout.unwrap_or(opts.io_timeout))
        .read_timeout(opts.io_timeout)
        .pool_max_idle_per_host(32)
        .redirect(reqwest::redirect::Policy::limited(5));
    if tls.insecure {
        builder = builder.danger_accept_invalid_certs(true);
    }
    for ca in &tls.ca {
        let pem = read(ca, source)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| problem(format!("CA file {}: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(problem(format!(
                "CA file {} holds no certificate",
                ca.display()
            )));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    // One client certificate per host: the first pair (a TLS client offers one identity).
    if let Some((cert, key)) = tls.client.first() {
        let mut pem = read(cert, source)?;
        if let Some(key) = key {
            pem.push(b'\n');
            pem.extend(read(key, source)?);
        }
        let identity = reqwest::Identity::from_pem(&pem)
            .map_err(|e| problem(format!("client certificate {}: {e}", cert.display())))?;
        builder = builder.identity(identity);
    }
    if let Some(proxy) = tls.proxy.as_deref() {
        let proxy =
            reqwest::Proxy::all(proxy).map_err(|e| problem(format!("proxy {proxy:?}: {e}")))?;
        builder = builder.proxy(proxy);
    }
    builder
        .build()
        .map_err(|e| problem(format!("cannot build the HTTP client: {e}")))
}

/// What an HTTP client is built from.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct TlsSettings {
    /// Accept any certificate.
    pub insecure: bool,
    /// Extra CA files.
    pub ca: Vec<PathBuf>,
    /// Client certificate pairs (the first is used).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Connect timeout, when not the client's.
    pub dial_timeout: Option<Duration>,
    /// Proxy URL.
    pub proxy: Option<String>,
}

impl TlsSettings {
    /// The client options' own settings.
    pub fn of_options(opts: &ClientOptions) -> TlsSettings {
        TlsSettings {
            insecure: opts.insecure,
            ca: opts.ca_file.iter().cloned().collect(),
            ..TlsSettings::default()
        }
    }

    /// A host file's settings; for the server, the options fill what the file does not say.
    fn of_host(s: &HostSettings, fallback: Option<&TlsSettings>) -> TlsSettings {
        let base = fallback.cloned().unwrap_or_default();
        TlsSettings {
            insecure: s.skip_verify.unwrap_or(base.insecure),
            ca: if s.ca.is_empty() {
                base.ca
            } else {
                s.ca.clone()
            },
            client: s.client.clone(),
            dial_timeout: s.dial_timeout,
            proxy: s.proxy.clone(),
        }
    }
}

/// The registry's server when no file names one: `registry-1.docker.io` for Docker Hub, `http`
/// with `plain_http` (as [`crate::Client::base_url`]).
fn default_server(registry: &str, opts: &ClientOptions) -> HostUrl {
    let authority = if registry == "docker.io" {
        "registry-1.docker.io"
    } else {
        registry
    };
    HostUrl {
        scheme: if opts.plain_http {
            "http".into()
        } else {
            "https".into()
        },
        authority: authority.to_owned(),
        path: "/v2".into(),
    }
}

fn headers(settings: &HostSettings) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in &settings.headers {
        // Checked when the file was parsed.
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            map.append(n, v);
        }
    }
    map
}

/// The hosts of `registry`: from its hosts file `file` (as read from `opts.hosts_dir`) when
/// there is one, else the server alone, reached with `default_http` (the client built from
/// `opts`). `previous`: the hosts of an earlier reading, whose unchanged hosts are kept (see
/// [`Endpoints`]).
pub(crate) fn build(
    registry: &str,
    file: Option<&HostsFile>,
    opts: &ClientOptions,
    default_http: &reqwest::Client,
    previous: Option<&Endpoints>,
) -> Result<Endpoints> {
    let own = TlsSettings::of_options(opts);
    let make = |url: &HostUrl,
                settings: &HostSettings,
                server: bool,
                tls: TlsSettings,
                source: Option<&Path>|
     -> Result<Arc<Endpoint>> {
        let origin = Origin {
            url: url.clone(),
            settings: settings.clone(),
            tls: tls.clone(),
            server,
        };
        if let Some(kept) = previous
            .into_iter()
            .flat_map(|p| p.list.iter())
            .find(|e| e.unchanged(&origin))
        {
            return Ok(kept.clone());
        }
        let (http, files) = if tls == own {
            (default_http.clone(), Vec::new())
        } else {
            // Stamped before they are read: a change after this is noticed next time.
            let mut paths = tls.ca.clone();
            for (cert, key) in &tls.client {
                paths.push(cert.clone());
                paths.extend(key.clone());
            }
            let files = paths.into_iter().map(|p| (p.clone(), stamp(&p))).collect();
            (http_client(opts, &tls, source)?, files)
        };
        let base = format!("{}://{}", url.scheme, url.authority);
        let is_registry = url.authority == registry
            || (registry == "docker.io" && url.authority == "registry-1.docker.io");
        Ok(Arc::new(Endpoint {
            root: format!("{base}{}", url.path),
            base,
            auth_key: if is_registry {
                registry.to_owned()
            } else {
                url.authority.clone()
            },
            server,
            own_registry: is_registry,
            caps: settings.capabilities,
            ns: (!is_registry).then(|| registry.to_owned()),
            http,
            headers: headers(settings),
            failing: AtomicBool::new(false),
            served_wrong: AtomicBool::new(false),
            down_until: Mutex::new(None),
            origin,
            files,
        }))
    };
    let mut list = Vec::new();
    let source = file.map(|f| f.source.clone());
    match file {
        None => {
            let settings = HostSettings {
                capabilities: hosts::ALL,
                ..HostSettings::default()
            };
            list.push(make(
                &default_server(registry, opts),
                &settings,
                true,
                own.clone(),
                None,
            )?);
        }
        Some(f) => {
            for host in &f.hosts {
                let tls = TlsSettings::of_host(&host.settings, None);
                list.push(make(
                    &host.url,
                    &host.settings,
                    false,
                    tls,
                    Some(&f.source),
                )?);
            }
            let url = f
                .server
                .clone()
                .unwrap_or_else(|| default_server(registry, opts));
            let tls = TlsSettings::of_host(&f.server_settings, Some(&own));
            list.push(make(&url, &f.server_settings, true, tls, Some(&f.source))?);
            tracing::debug!(registry, file = %f.source.display(), hosts = f.hosts.len(), "registry hosts file");
        }
    }
    Ok(Endpoints {
        list,
        source,
        registry: registry.to_owned(),
        served: Mutex::new(HashMap::new()),
        banned: Mutex::new(HashMap::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(text: &str) -> HostsFile {
        hosts::parse(Path::new("/etc/certs.d/reg:5000/hosts.toml"), text).expect("parses")
    }

    fn roots(e: &Endpoints) -> Vec<&str> {
        e.list.iter().map(|h| h.root.as_str()).collect()
    }

    #[test]
    fn a_new_reading_keeps_unchanged_hosts_and_what_blobs_say_of_them() {
        let opts = ClientOptions::new();
        let http = http_client(&opts, &TlsSettings::of_options(&opts), None).expect("client");
        let build_from = |text: &str, previous: Option<&Endpoints>| {
            build("reg:5000", Some(&reading(text)), &opts, &http, previous).expect("build")
        };
        let first = build_from(
            "server = \"http://reg:5000\"\n[host.\"http://a\"]\n[host.\"http://b\"]\n",
            None,
        );
        let (a, b) = (first.list[0].clone(), first.list[1].clone());
        let bad = Digest::sha256_of(b"wrong from a");
        let served = Digest::sha256_of(b"served by b");
        first.ban(&bad, &a, "test");
        first.note_served(&served, &b);
        first.failed(&b, Failure::Unreachable, "test");
        assert!(b.cooling());

        // `c` comes first, `a` moves last, `b` gets a header; the server stays.
        let second = build_from(
            "server = \"http://reg:5000\"\n[host.\"http://c\"]\n\
             [host.\"http://b\"]\n  header = { x = \"1\" }\n[host.\"http://a\"]\n",
            Some(&first),
        );
        second.carry_over(&first);
        assert_eq!(
            roots(&second),
            [
                "http://c/v2",
                "http://b/v2",
                "http://a/v2",
                "http://reg:5000/v2"
            ]
        );
        assert!(Arc::ptr_eq(&second.list[2], &a), "unchanged: the same host");
        assert!(Arc::ptr_eq(
            &second.list[3],
            first.server().expect("server")
        ));
        assert!(
            !Arc::ptr_eq(&second.list[1], &b),
            "changed settings: a new host"
        );
        assert!(!second.list[1].cooling(), "the edit may be the fix");
        assert!(!second.same_as(&first));

        // `a` still may not serve `bad`; `b`'s bytes of `served` can still be pinned on it.
        let hosts_for_bad = second.candidates(hosts::PULL, Some(&bad)).expect("hosts");
        let hosts_for_bad: Vec<_> = hosts_for_bad.iter().map(|h| h.root.as_str()).collect();
        assert_eq!(
            hosts_for_bad,
            ["http://c/v2", "http://b/v2", "http://reg:5000/v2"]
        );
        assert!(second.distrust(&served));
        let hosts_for_served = second
            .candidates(hosts::PULL, Some(&served))
            .expect("hosts");
        assert!(!hosts_for_served.iter().any(|h| h.root == "http://b/v2"));

        // A host of the earlier reading (a body still open) is found by its URL.
        let late = Digest::sha256_of(b"late");
        second.ban(&late, &b, "test");
        let hosts_for_late = second.candidates(hosts::PULL, Some(&late)).expect("hosts");
        assert!(!hosts_for_late.iter().any(|h| h.root == "http://b/v2"));

        // Read again with nothing changed: the very same hosts.
        let third = build_from(
            "server = \"http://reg:5000\"\n[host.\"http://c\"]\n\
             [host.\"http://b\"]\n  header = { x = \"1\" }\n[host.\"http://a\"]\n",
            Some(&second),
        );
        assert!(third.same_as(&second));
    }
}
