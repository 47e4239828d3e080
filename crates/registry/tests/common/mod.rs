//! Set-up shared by the registry's integration tests.

use std::path::Path;

use modelpack_registry::{Client, ClientOptions, Repository};

/// The repository `reference` names, through a client that reads registry hosts from `hosts`.
pub fn repo_with_hosts(hosts: &Path, reference: &str) -> Repository {
    let client = Client::new(ClientOptions {
        hosts_dir: Some(hosts.to_owned()),
        ..ClientOptions::new()
    })
    .expect("client");
    Repository::new(&client, &reference.parse().expect("reference"))
}

/// A fresh hosts folder (returned, to keep) whose `hosts.toml` for `upstream` names it as the
/// `server` and one mirror `mirror_host` with `capabilities`; and the repository
/// `upstream/repo_and_tag` through a client reading it.
pub fn repo_through_mirror(
    upstream: &str,
    mirror_host: &str,
    capabilities: &str,
    repo_and_tag: &str,
) -> (tempfile::TempDir, Repository) {
    let hosts = tempfile::tempdir().expect("tempdir");
    modelpack_testkit::registry::write_hosts_toml(
        hosts.path(),
        upstream,
        upstream,
        mirror_host,
        capabilities,
    )
    .expect("write hosts.toml");
    let repo = repo_with_hosts(hosts.path(), &format!("{upstream}/{repo_and_tag}"));
    (hosts, repo)
}
