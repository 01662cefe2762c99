//! The `--etcd*` and `--prefix` flags every etcd-using command shares, and
//! turning them into an etcd client configuration.
use std::path::PathBuf;

use clap::Args;

pub const DEFAULT_PREFIX: &str = "/discovery/";
pub const DEFAULT_ETCD: &str = "http://127.0.0.1:2379";

#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma separated.
    #[arg(long = "etcd", env = "DISCOVERY_ETCD", value_delimiter = ',', default_value = DEFAULT_ETCD)]
    pub endpoints: Vec<String>,

    /// Key prefix of the discovery tree in etcd.
    #[arg(long, env = "DISCOVERY_PREFIX", default_value = DEFAULT_PREFIX, value_parser = parse_prefix)]
    pub prefix: String,

    /// CA certificate (PEM) that signed the etcd servers' certificates;
    /// needed for https:// endpoints.
    #[arg(long, env = "DISCOVERY_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for etcd's --client-cert-auth.
    #[arg(long, env = "DISCOVERY_ETCD_CERT_FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,

    /// Key (PEM) of the client certificate.
    #[arg(long, env = "DISCOVERY_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,

    /// etcd user, for etcd's password authentication.
    #[arg(long, env = "DISCOVERY_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,

    /// File holding the etcd user's password (kept out of the command line).
    #[arg(long, env = "DISCOVERY_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// Reads the certificate and password files now, so a wrong path is a
    /// clear error at start rather than an endless retry.
    pub fn config(&self) -> anyhow::Result<crate::etcd::EtcdConfig> {
        use anyhow::Context as _;
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()))
        };
        // clap checks these pairs on the command line and in the
        // environment, but not in `run`'s config file (its values are the
        // flags' defaults).
        if self.etcd_cert_file.is_some() != self.etcd_key_file.is_some() {
            anyhow::bail!("--etcd-cert-file and --etcd-key-file go together");
        }
        if self.etcd_user.is_some() != self.etcd_password_file.is_some() {
            anyhow::bail!("--etcd-user and --etcd-password-file go together");
        }
        let https = self.endpoints.iter().any(|e| e.starts_with("https://"));
        let ca = self
            .etcd_ca_file
            .as_ref()
            .map(|p| read(p, "--etcd-ca-file"))
            .transpose()?;
        if https && ca.is_none() {
            anyhow::bail!("https:// etcd endpoints need --etcd-ca-file");
        }
        if !https && (ca.is_some() || self.etcd_cert_file.is_some()) {
            anyhow::bail!("TLS files given but the etcd endpoints are not https://");
        }
        let identity = match (&self.etcd_cert_file, &self.etcd_key_file) {
            (Some(c), Some(k)) => Some((read(c, "--etcd-cert-file")?, read(k, "--etcd-key-file")?)),
            _ => None,
        };
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(u), Some(p)) => {
                let pw = String::from_utf8(read(p, "--etcd-password-file")?)
                    .context("--etcd-password-file is not UTF-8")?;
                Some((u.clone(), pw.trim_end_matches(['\n', '\r']).to_owned()))
            }
            _ => None,
        };
        Ok(crate::etcd::EtcdConfig {
            endpoints: self.endpoints.clone(),
            ca,
            identity,
            user,
        })
    }
}

/// A prefix is an absolute etcd key path ending in '/'; the slash is added
/// if missing so `/discovery` and `/discovery/` mean the same tree.
fn parse_prefix(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("prefix {s:?} must start with '/'"));
    }
    if s.contains("//") || s.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!("prefix {s:?} has an empty, '.' or '..' segment"));
    }
    Ok(if s.ends_with('/') {
        s.to_owned()
    } else {
        format!("{s}/")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_normalised_and_checked() {
        assert_eq!(parse_prefix("/discovery").unwrap(), "/discovery/");
        assert_eq!(parse_prefix("/a/b/").unwrap(), "/a/b/");
        assert!(parse_prefix("discovery/").is_err());
        assert!(parse_prefix("/a//b/").is_err());
        assert!(parse_prefix("/a/../b/").is_err());
    }
}
