//! Registry hosts as containerd reads them (`docs/hosts.md` of containerd): for a registry
//! `HOST[:PORT]`, the first folder of `<hosts_dir>/HOST_PORT_`, `<hosts_dir>/HOST[:PORT]` and
//! `<hosts_dir>/_default` that exists holds either a `hosts.toml` or, without one, Docker's
//! certificate files (`*.crt` CAs, `*.cert`/`*.key` client pairs) for the registry itself.
//!
//! A `hosts.toml` lists `[host."URL"]` tables, tried in file order, then the `server` (the
//! registry itself when absent). Each has `capabilities` (`pull`, `resolve`, `push`; all three by
//! default), `ca`, `client`, `skip_verify`, `override_path`, `dial_timeout`, `proxy` and a
//! `[header]` table; the top-level keys describe the server. Paths are relative to the file.
//! Only parsing lives here; [`crate::endpoint`] turns the result into clients.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// The host may serve blobs and manifests by digest (verified by digest).
pub(crate) const PULL: u8 = 1;
/// The host may turn a tag into a digest (trusted).
pub(crate) const RESOLVE: u8 = 2;
/// The host may receive uploads.
pub(crate) const PUSH: u8 = 4;
/// What a host may do when its file does not say.
pub(crate) const ALL: u8 = PULL | RESOLVE | PUSH;

/// How to reach one host, as its file describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HostSettings {
    /// `PULL | RESOLVE | PUSH` bits.
    pub capabilities: u8,
    /// Extra CA certificates (PEM).
    pub ca: Vec<PathBuf>,
    /// Client certificates: (certificate, key); no key: the key is in the certificate file.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// `skip_verify`, when the file says.
    pub skip_verify: Option<bool>,
    /// Extra request headers, each value separately (a name may repeat).
    pub headers: Vec<(String, String)>,
    /// `dial_timeout`.
    pub dial_timeout: Option<Duration>,
    /// `proxy` URL.
    pub proxy: Option<String>,
}

/// A host URL split as requests need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostUrl {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]`.
    pub authority: String,
    /// The API root: `/v2`, or the URL's own path with `override_path`.
    pub path: String,
}

/// One `[host."URL"]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostEntry {
    /// Where it is.
    pub url: HostUrl,
    /// How to reach it.
    pub settings: HostSettings,
}

/// What a registry's host folder says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostsFile {
    /// The file (or folder, for certificate files) it came from, for messages.
    pub source: PathBuf,
    /// Mirrors, in file order.
    pub hosts: Vec<HostEntry>,
    /// The `server` URL, when the file names one.
    pub server: Option<HostUrl>,
    /// The top-level settings, which describe the server.
    pub server_settings: HostSettings,
}

/// The host folder for `registry` under `dir`, as containerd looks it up, or `None`.
pub(crate) fn find(dir: &Path, registry: &str) -> Result<Option<HostsFile>> {
    folder(dir, registry).map(|f| read_folder(&f)).transpose()
}

/// The first of `HOST_PORT_`, `HOST[:PORT]` and `_default` under `dir` that is a folder.
pub(crate) fn folder(dir: &Path, registry: &str) -> Option<PathBuf> {
    let mut names = Vec::new();
    if let Some((host, port)) = registry.rsplit_once(':')
        && !host.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        names.push(format!("{host}_{port}_"));
    }
    names.push(registry.to_owned());
    names.push("_default".to_owned());
    names
        .into_iter()
        .map(|name| dir.join(name))
        .find(|folder| folder.is_dir())
}

/// What a host folder says: its `hosts.toml`, or without one its certificate files.
fn read_folder(folder: &Path) -> Result<HostsFile> {
    let file = folder.join("hosts.toml");
    match std::fs::read_to_string(&file) {
        Ok(text) => parse(&file, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => cert_files(folder),
        Err(e) => Err(Error::Io {
            context: format!("reading hosts file {}", file.display()),
            source: e,
        }),
    }
}

/// A file's identity and version as `stat` (following links) tells them: a rewrite in place,
/// a rename over it, a `touch` or a swapped Kubernetes volume link all change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The stamp of `path`, `None` when it cannot be looked at (missing, no permission).
pub(crate) fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// What a registry's host folder looked like, cheaply: which candidate folder is used, the
/// stamp of each of its entries (the `hosts.toml`, or Docker's certificate files) and of the
/// files a reading named elsewhere. Equal fingerprints: nothing to read again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    folder: Option<PathBuf>,
    entries: Vec<(std::ffi::OsString, Option<Stamp>)>,
    named: Vec<(PathBuf, Option<Stamp>)>,
}

impl Fingerprint {
    /// Looks at `registry`'s folder under `dir` now (a few `stat` calls and one listing);
    /// `named`: the files the last good reading named (CAs, client certificates).
    pub fn take(dir: &Path, registry: &str, named: &[PathBuf]) -> Fingerprint {
        let folder = folder(dir, registry);
        let mut entries: Vec<_> = folder
            .as_deref()
            .and_then(|f| std::fs::read_dir(f).ok())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| (e.file_name(), stamp(&e.path())))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Fingerprint {
            folder,
            entries,
            named: named.iter().map(|p| (p.clone(), stamp(p))).collect(),
        }
    }

    /// The same look with `named` stamped afresh (after a reading named other files).
    pub fn with_named(mut self, named: &[PathBuf]) -> Fingerprint {
        self.named = named.iter().map(|p| (p.clone(), stamp(p))).collect();
        self
    }
}

impl HostSettings {
    /// The files these settings name (CAs, client certificates and keys).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = self.ca.clone();
        for (cert, key) in &self.client {
            files.push(cert.clone());
            files.extend(key.clone());
        }
        files
    }
}

impl HostsFile {
    /// Every file the hosts and the server name.
    pub fn named_files(&self) -> Vec<PathBuf> {
        let mut files = self.server_settings.files();
        for host in &self.hosts {
            files.extend(host.settings.files());
        }
        files.sort();
        files.dedup();
        files
    }
}

/// Docker's `certs.d` pattern: `*.crt` are CAs, `NAME.cert` with `NAME.key` client pairs.
fn cert_files(folder: &Path) -> Result<HostsFile> {
    let entries = std::fs::read_dir(folder).map_err(|e| Error::Io {
        context: format!("reading {}", folder.display()),
        source: e,
    })?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let mut settings = HostSettings {
        capabilities: ALL,
        ..HostSettings::default()
    };
    for path in &paths {
        match path.extension().and_then(|e| e.to_str()) {
            Some("crt") => settings.ca.push(path.clone()),
            Some("cert") => {
                let key = path.with_extension("key");
                if key.exists() {
                    settings.client.push((path.clone(), Some(key)));
                }
            }
            _ => {}
        }
    }
    Ok(HostsFile {
        source: folder.to_owned(),
        hosts: Vec::new(),
        server: None,
        server_settings: settings,
    })
}

/// One line naming the file, and the line of the problem when known.
fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::HostsFile {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Parses a `hosts.toml`.
pub(crate) fn parse(path: &Path, text: &str) -> Result<HostsFile> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().trim().to_owned();
        bad(
            path,
            match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            },
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let server_settings = settings(path, base, &table, "")?;
    let server = match table.get("server") {
        None => None,
        Some(toml::Value::String(s)) => Some(host_url(path, s, &table, "server")?),
        Some(_) => return Err(bad(path, "`server` must be a string")),
    };
    let mut hosts = Vec::new();
    match table.get("host") {
        None => {}
        Some(toml::Value::Table(entries)) => {
            for (url, value) in entries {
                let toml::Value::Table(entry) = value else {
                    return Err(bad(path, format!("`host.\"{url}\"` must be a table")));
                };
                let what = format!("host.\"{url}\"");
                hosts.push(HostEntry {
                    url: host_url(path, url, entry, &what)?,
                    settings: settings(path, base, entry, &what)?,
                });
            }
        }
        Some(_) => return Err(bad(path, "`host` must hold `[host.\"URL\"]` tables")),
    }
    for key in table.keys() {
        if !KNOWN_KEYS.contains(&key.as_str()) && key != "server" && key != "host" {
            tracing::warn!(file = %path.display(), key, "unknown key in a hosts file; ignored");
        }
    }
    Ok(HostsFile {
        source: path.to_owned(),
        hosts,
        server,
        server_settings,
    })
}

/// The keys of a host (and of the file's top level, for the server).
const KNOWN_KEYS: [&str; 8] = [
    "capabilities",
    "ca",
    "client",
    "skip_verify",
    "override_path",
    "header",
    "dial_timeout",
    "proxy",
];

/// `URL` as containerd reads it: `https://` when no scheme is given, `/v2` appended to the path
/// unless it ends with it or `override_path` is set.
fn host_url(path: &Path, text: &str, table: &toml::Table, what: &str) -> Result<HostUrl> {
    let full = if text.starts_with("http://") || text.starts_with("https://") {
        text.to_owned()
    } else if text.contains("://") {
        return Err(bad(
            path,
            format!("{what}: {text:?} is not an http:// or https:// URL"),
        ));
    } else {
        format!("https://{text}")
    };
    let url = reqwest::Url::parse(&full)
        .map_err(|e| bad(path, format!("{what}: {text:?} is not a URL ({e})")))?;
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad(path, format!("{what}: {text:?} has no host")))?;
    if url.query().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            path,
            format!("{what}: a host URL has no query and no user name"),
        ));
    }
    let authority = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    let override_path = boolean(path, table, "override_path", what)?.unwrap_or(false);
    let trimmed = url.path().trim_end_matches('/');
    let api = if override_path || trimmed.ends_with("/v2") {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v2")
    };
    Ok(HostUrl {
        scheme: url.scheme().to_owned(),
        authority,
        path: api,
    })
}

fn boolean(path: &Path, table: &toml::Table, key: &str, what: &str) -> Result<Option<bool>> {
    match table.get(key) {
        None => Ok(None),
        Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(
            path,
            format!("{}`{key}` must be true or false", prefix(what)),
        )),
    }
}

fn prefix(what: &str) -> String {
    if what.is_empty() {
        String::new()
    } else {
        format!("{what}: ")
    }
}

/// A string or an array of strings.
fn strings(path: &Path, value: &toml::Value, key: &str, what: &str) -> Result<Vec<String>> {
    let wrong = || {
        bad(
            path,
            format!(
                "{}`{key}` must be a string or an array of strings",
                prefix(what)
            ),
        )
    };
    match value {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(wrong))
            .collect(),
        _ => Err(wrong()),
    }
}

fn relative(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

/// A Go duration as containerd writes it: `500ms`, `1s`, `2m`, `1m30s`.
fn go_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(Duration::try_from_secs_f64(number * seconds).ok()?)?;
    }
    Some(total)
}

/// The settings keys of `table` (a host table, or the file's top level for the server).
fn settings(path: &Path, base: &Path, table: &toml::Table, what: &str) -> Result<HostSettings> {
    let mut s = HostSettings {
        capabilities: ALL,
        ..HostSettings::default()
    };
    if let Some(value) = table.get("capabilities") {
        s.capabilities = 0;
        for c in strings(path, value, "capabilities", what)? {
            s.capabilities |= match c.to_ascii_lowercase().as_str() {
                "pull" => PULL,
                "resolve" => RESOLVE,
                "push" => PUSH,
                _ => {
                    return Err(bad(
                        path,
                        format!(
                            "{}unknown capability {c:?} (pull, resolve or push)",
                            prefix(what)
                        ),
                    ));
                }
            };
        }
    }
    if let Some(value) = table.get("ca") {
        s.ca = strings(path, value, "ca", what)?
            .iter()
            .map(|p| relative(base, p))
            .collect();
    }
    if let Some(value) = table.get("client") {
        let wrong = || {
            bad(
                path,
                format!(
                    "{}`client` must be a path, an array of paths or of [certificate, key] pairs",
                    prefix(what)
                ),
            )
        };
        let items = match value {
            toml::Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        for item in items {
            match item {
                toml::Value::String(cert) => s.client.push((relative(base, &cert), None)),
                toml::Value::Array(pair) => {
                    let cert = pair.first().and_then(|v| v.as_str()).ok_or_else(wrong)?;
                    let key = match pair.get(1) {
                        None => None,
                        Some(toml::Value::String(k)) if k.is_empty() => None,
                        Some(toml::Value::String(k)) => Some(relative(base, k)),
                        Some(_) => return Err(wrong()),
                    };
                    if pair.len() > 2 {
                        return Err(wrong());
                    }
                    s.client.push((relative(base, cert), key));
                }
                _ => return Err(wrong()),
            }
        }
    }
    s.skip_verify = boolean(path, table, "skip_verify", what)?;
    if let Some(value) = table.get("header") {
        let toml::Value::Table(headers) = value else {
            return Err(bad(
                path,
                format!("{}`header` must be a table", prefix(what)),
            ));
        };
        for (name, value) in headers {
            for v in strings(path, value, &format!("header.{name}"), what)? {
                if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
                    || reqwest::header::HeaderValue::from_str(&v).is_err()
                {
                    return Err(bad(
                        path,
                        format!("{}header {name:?} is not a valid HTTP header", prefix(what)),
                    ));
                }
                s.headers.push((name.clone(), v));
            }
        }
    }
    if let Some(value) = table.get("dial_timeout") {
        let text = value.as_str().unwrap_or_default();
        s.dial_timeout = Some(go_duration(text).ok_or_else(|| {
            bad(
                path,
                format!(
                    "{}`dial_timeout` must be a duration such as \"1s\" or \"500ms\"",
                    prefix(what)
                ),
            )
        })?);
    }
    if let Some(value) = table.get("proxy") {
        let text = value
            .as_str()
            .filter(|t| t.starts_with("http://") || t.starts_with("https://"))
            .ok_or_else(|| {
                bad(
                    path,
                    format!("{}`proxy` must be an http:// or https:// URL", prefix(what)),
                )
            })?;
        s.proxy = Some(text.to_owned());
    }
    if !what.is_empty() {
        for key in table.keys() {
            if !KNOWN_KEYS.contains(&key.as_str()) {
                tracing::warn!(file = %path.display(), host = what, key, "unknown key in a hosts file; ignored");
            }
        }
    }
    Ok(s)
}

/// `localhost`, 127.0.0.0/8 and ::1, with or without a port: hosts reached over plain HTTP
/// unless said otherwise, as Docker treats them.
pub fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or(host)
    } else {
        host
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised_with_and_without_ports() {
        for host in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.3.2.1",
            "127.1.2.3",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "registry.example",
            "registry.example:5000",
            "10.0.0.1:5000",
            "localhost.example:5000",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    fn parsed(text: &str) -> HostsFile {
        parse(Path::new("/etc/certs.d/reg/hosts.toml"), text).expect("parses")
    }

    #[test]
    fn reads_the_containerd_example_in_order() {
        let f = parsed(
            r#"
server = "https://registry-1.docker.io"

[host."https://public-mirror.example.com"]
  capabilities = ["pull"]
[host."http://docker-mirror.internal:5000"]
  capabilities = ["pull", "resolve"]
  ca = "docker-mirror.crt"
  client = [["/etc/certs/client.cert", "/etc/certs/client.key"], ["client.pem", ""]]
  skip_verify = true
  dial_timeout = "1s500ms"
  [host."http://docker-mirror.internal:5000".header]
    x-custom = ["a", "b"]
[host."https://non-compliant.registry/v2/upstream"]
  override_path = true
[host."https://mirror.example/sub"]
"#,
        );
        let server = f.server.expect("server");
        assert_eq!(server.scheme, "https");
        assert_eq!(server.authority, "registry-1.docker.io");
        assert_eq!(server.path, "/v2");
        assert_eq!(f.server_settings.capabilities, ALL);
        let urls: Vec<_> = f.hosts.iter().map(|h| h.url.authority.as_str()).collect();
        assert_eq!(
            urls,
            [
                "public-mirror.example.com",
                "docker-mirror.internal:5000",
                "non-compliant.registry",
                "mirror.example"
            ]
        );
        assert_eq!(f.hosts[0].settings.capabilities, PULL);
        let m = &f.hosts[1];
        assert_eq!(m.url.scheme, "http");
        assert_eq!(m.settings.capabilities, PULL | RESOLVE);
        assert_eq!(
            m.settings.ca,
            [PathBuf::from("/etc/certs.d/reg/docker-mirror.crt")]
        );
        assert_eq!(
            m.settings.client,
            [
                (
                    PathBuf::from("/etc/certs/client.cert"),
                    Some(PathBuf::from("/etc/certs/client.key"))
                ),
                (PathBuf::from("/etc/certs.d/reg/client.pem"), None)
            ]
        );
        assert_eq!(m.settings.skip_verify, Some(true));
        assert_eq!(m.settings.dial_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(
            m.settings.headers,
            [
                ("x-custom".to_owned(), "a".to_owned()),
                ("x-custom".to_owned(), "b".to_owned())
            ]
        );
        assert_eq!(f.hosts[2].url.path, "/v2/upstream");
        assert_eq!(f.hosts[2].settings.capabilities, ALL);
        assert_eq!(f.hosts[3].url.path, "/sub/v2");
    }

    #[test]
    fn a_file_without_server_or_hosts_is_valid() {
        let f = parsed("");
        assert!(f.server.is_none());
        assert!(f.hosts.is_empty());
        let f = parsed("server = \"registry.example:5000\"\nskip_verify = true\n");
        let server = f.server.expect("server");
        assert_eq!(server.scheme, "https");
        assert_eq!(server.authority, "registry.example:5000");
        assert_eq!(f.server_settings.skip_verify, Some(true));
    }

    #[test]
    fn bad_files_give_one_line_naming_the_file() {
        for (text, needle) in [
            ("server = 5", "`server` must be a string"),
            (
                "[host.\"http://m\"]\ncapabilities = [\"pull\", \"fetch\"]",
                "unknown capability \"fetch\"",
            ),
            ("[host.\"http://m\"]\nskip_verify = \"yes\"", "skip_verify"),
            ("server = \"ftp://x\"", "not an http:// or https:// URL"),
            (
                "[host.\"http://m\"]\ndial_timeout = \"soon\"",
                "dial_timeout",
            ),
            ("server = \"https://a\"\n[host", "line 2"),
            ("[host.\"http://m\"]\nclient = 3", "`client`"),
        ] {
            let err = parse(Path::new("/x/hosts.toml"), text)
                .expect_err(text)
                .to_string();
            assert!(err.contains("/x/hosts.toml"), "{err}");
            assert!(err.contains(needle), "{text}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn folders_are_found_as_containerd_looks_them_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(find(dir.path(), "reg:5000").expect("find").is_none());
        std::fs::create_dir_all(dir.path().join("_default")).expect("mkdir");
        std::fs::write(
            dir.path().join("_default/hosts.toml"),
            "[host.\"http://any\"]\n",
        )
        .expect("write");
        let f = find(dir.path(), "reg:5000")
            .expect("find")
            .expect("default");
        assert_eq!(f.hosts[0].url.authority, "any");
        std::fs::create_dir_all(dir.path().join("reg:5000")).expect("mkdir");
        std::fs::write(dir.path().join("reg:5000/ca.crt"), "").expect("write");
        let f = find(dir.path(), "reg:5000").expect("find").expect("certs");
        assert!(f.hosts.is_empty());
        assert_eq!(f.server_settings.ca, [dir.path().join("reg:5000/ca.crt")]);
        std::fs::create_dir_all(dir.path().join("reg_5000_")).expect("mkdir");
        std::fs::write(
            dir.path().join("reg_5000_/hosts.toml"),
            "server = \"http://reg:5000\"\n",
        )
        .expect("write");
        let f = find(dir.path(), "reg:5000").expect("find").expect("file");
        assert_eq!(f.server.expect("server").scheme, "http");
    }

    fn set_mtime(path: &Path, secs: u64) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .expect("open")
            .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs))
            .expect("set mtime");
    }

    #[test]
    fn the_fingerprint_changes_with_the_file_the_folder_and_the_files_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let take = |named: &[PathBuf]| Fingerprint::take(dir.path(), "reg:5000", named);
        let none = take(&[]);
        assert_eq!(none, take(&[]));
        let folder = dir.path().join("reg:5000");
        std::fs::create_dir_all(&folder).expect("mkdir");
        let file = folder.join("hosts.toml");
        std::fs::write(&file, "ca = \"ca.pem\"\n").expect("write");
        set_mtime(&file, 1_000);
        let first = take(&[]);
        assert_ne!(first, none, "a new folder");
        assert_eq!(first, take(&[]), "nothing changed");

        // Rewritten in place with the same length: the modification time tells.
        std::fs::write(&file, "ca = \"cb.pem\"\n").expect("write");
        set_mtime(&file, 1_001);
        let second = take(&[]);
        assert_ne!(second, first);
        // Replaced by a rename (as editors and config tools do): another inode.
        let new = folder.join("hosts.toml.new");
        std::fs::write(&new, "ca = \"cb.pem\"\n").expect("write");
        set_mtime(&new, 1_001);
        std::fs::rename(&new, &file).expect("rename");
        assert_ne!(take(&[]), second);

        // A file the reading named, here or elsewhere.
        let named = [folder.join("cb.pem")];
        let without = take(&named);
        std::fs::write(&named[0], "pem").expect("write");
        let with = take(&named);
        assert_ne!(with, without, "the CA appeared");
        set_mtime(&named[0], 5);
        assert_ne!(take(&named), with, "the CA changed");

        // A more specific folder takes over.
        let before = take(&named);
        std::fs::create_dir_all(dir.path().join("reg_5000_")).expect("mkdir");
        assert_ne!(take(&named), before);
    }

    #[test]
    fn certificate_folders_change_with_their_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let folder = dir.path().join("reg");
        std::fs::create_dir_all(&folder).expect("mkdir");
        std::fs::write(folder.join("ca.crt"), "").expect("write");
        let first = Fingerprint::take(dir.path(), "reg", &[]);
        std::fs::write(folder.join("client.cert"), "").expect("write");
        let second = Fingerprint::take(dir.path(), "reg", &[]);
        assert_ne!(second, first, "a new file");
        std::fs::write(folder.join("ca.crt"), "pem").expect("write");
        assert_ne!(
            Fingerprint::take(dir.path(), "reg", &[]),
            second,
            "a CA rewritten"
        );
    }

    #[test]
    fn named_files_are_every_ca_and_client_file() {
        let f = parsed(
            r#"
ca = "server-ca.pem"
[host."http://a"]
  ca = ["a.crt", "server-ca.pem"]
  client = [["/c/a.cert", "/c/a.key"], ["b.pem", ""]]
"#,
        );
        let base = Path::new("/etc/certs.d/reg");
        assert_eq!(
            f.named_files(),
            [
                PathBuf::from("/c/a.cert"),
                PathBuf::from("/c/a.key"),
                base.join("a.crt"),
                base.join("b.pem"),
                base.join("server-ca.pem"),
            ]
        );
    }
}
