//! What to announce: one instance from flags, or many from a TOML file.
//!
//! ```toml
//! [[instance]]
//! service = "memcached"
//! addr = "10.0.0.5:11211"      # or "0.0.0.0:11211" / "[::]:11211": this host's address
//! # id = "host-a-11211"        # default <hostname>-<port>
//! # weight = 1
//! [instance.check]
//! type = "tcp"                  # tcp | http | command | none
//! # target = "10.0.0.5:11211"  # tcp/http address to check (default: addr)
//! # path = "/health"           # http
//! # command = "/usr/local/bin/check-memcached"
//! interval = "500ms"
//! timeout = "300ms"
//! rise = 2
//! fall = 3
//! ```
//!
//! A bad file is rejected at start with the file, line and reason; unknown
//! fields are errors here (a typo in a check must not silently disable it).
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::{
    health::{Check, CheckKind},
    schema::{MAX_WEIGHT, check_instance, check_name, parse_addr},
};

/// Defaults from [`crate::health::ANNOUNCER`].
pub const DEFAULT_INTERVAL: Duration = crate::health::ANNOUNCER.interval;
pub const DEFAULT_TIMEOUT: Duration = crate::health::ANNOUNCER.timeout;
pub const DEFAULT_RISE: u32 = crate::health::ANNOUNCER.rise;
pub const DEFAULT_FALL: u32 = crate::health::ANNOUNCER.fall;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub service: String,
    pub id: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub check: Check,
}

/// The fields of one instance as written (flags or file), before checks.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstance {
    pub service: String,
    pub addr: String,
    pub id: Option<String>,
    pub weight: Option<u32>,
    #[serde(default)]
    pub check: RawCheck,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub target: Option<String>,
    pub path: Option<String>,
    pub command: Option<String>,
    #[serde(default, deserialize_with = "duration")]
    pub interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    pub timeout: Option<Duration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    instance: Vec<toml::Spanned<RawInstance>>,
}

pub use crate::util::hostname;

/// Maps an unspecified address (its family) to this host's address.
pub type OwnAddress<'a> = dyn Fn(IpAddr) -> anyhow::Result<IpAddr> + 'a;

impl RawInstance {
    /// The one instance given by flags (without --config).
    pub fn from_args(a: &crate::config::InstanceArgs) -> anyhow::Result<Self> {
        let (Some(service), Some(addr)) = (&a.service, &a.addr) else {
            anyhow::bail!("--service and --addr are required without --config");
        };
        Ok(RawInstance {
            service: service.clone(),
            addr: addr.clone(),
            id: a.id.clone(),
            weight: a.weight,
            check: RawCheck {
                kind: a.check.clone(),
                target: a.check_target.clone(),
                path: a.check_path.clone(),
                command: a.check_command.clone(),
                interval: a.interval,
                timeout: a.timeout,
                rise: a.rise,
                fall: a.fall,
            },
        })
    }
}

impl RawInstance {
    /// Checks every field and fills in defaults. `own` gives this host's
    /// address for an address written as `0.0.0.0:P` or `[::]:P`.
    pub fn validate(self, own: &OwnAddress<'_>) -> anyhow::Result<Instance> {
        check_name(&self.service)?;
        let mut addr = parse_addr(&self.addr).map_err(|e| anyhow::anyhow!("addr: {e}"))?;
        if addr.ip().is_unspecified() {
            addr.set_ip(own(addr.ip()).map_err(|e| anyhow::anyhow!("addr: {e:#}"))?);
        }
        let id = self
            .id
            .unwrap_or_else(|| format!("{}-{}", hostname(), addr.port()));
        check_instance(&id)?;
        let weight = self.weight.unwrap_or(1);
        if weight > MAX_WEIGHT {
            bail!("weight {weight} is above the maximum {MAX_WEIGHT}");
        }
        let c = self.check;
        let target = match &c.target {
            Some(t) => parse_addr(t).map_err(|e| anyhow::anyhow!("check target: {e}"))?,
            None => addr,
        };
        let kind = match c.kind.as_deref().unwrap_or("tcp") {
            "none" => CheckKind::None,
            "tcp" => CheckKind::Tcp { target },
            "http" => {
                let path = c.path.as_deref().unwrap_or("/");
                if !path.starts_with('/') {
                    bail!("check path {path:?} must start with '/'");
                }
                CheckKind::Http {
                    url: format!("http://{target}{path}"),
                }
            }
            "command" => match c.command {
                Some(command) if !command.trim().is_empty() => CheckKind::Command { command },
                _ => bail!("check type \"command\" needs a command"),
            },
            other => bail!("unknown check type {other:?} (expected tcp, http, command or none)"),
        };
        let check = Check {
            kind,
            interval: c.interval.unwrap_or(DEFAULT_INTERVAL),
            timeout: c.timeout.unwrap_or(DEFAULT_TIMEOUT),
            rise: c.rise.unwrap_or(DEFAULT_RISE),
            fall: c.fall.unwrap_or(DEFAULT_FALL),
        };
        if check.interval < Duration::from_millis(10) {
            bail!("check interval {:?} is below 10ms", check.interval);
        }
        if check.timeout.is_zero() || check.timeout > check.interval {
            bail!(
                "check timeout {:?} must be above zero and at most the interval {:?}",
                check.timeout,
                check.interval
            );
        }
        if check.rise == 0 || check.fall == 0 {
            bail!("rise and fall must be at least 1");
        }
        Ok(Instance {
            service: self.service,
            id,
            addr,
            weight,
            check,
        })
    }
}

/// Reads a TOML file of instances; errors name the file and line.
pub fn load_file(path: &Path, own: &OwnAddress<'_>) -> anyhow::Result<Vec<Instance>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_file(&text, own).map_err(|(line, e)| match line {
        Some(line) => anyhow::anyhow!("{}:{line}: {e:#}", path.display()),
        None => anyhow::anyhow!("{}: {e:#}", path.display()),
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn parse_file(
    text: &str,
    own: &OwnAddress<'_>,
) -> Result<Vec<Instance>, (Option<usize>, anyhow::Error)> {
    let file: File = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        (line, anyhow::anyhow!("{}", e.message()))
    })?;
    if file.instance.is_empty() {
        return Err((None, anyhow::anyhow!("no [[instance]] entries")));
    }
    let mut out = Vec::new();
    for spanned in file.instance {
        let line = line_of(text, spanned.span().start);
        let inst = spanned
            .into_inner()
            .validate(own)
            .map_err(|e| (Some(line), e))?;
        out.push(inst);
    }
    check_unique(&out).map_err(|e| (None, e))?;
    Ok(out)
}

pub fn check_unique(instances: &[Instance]) -> anyhow::Result<()> {
    let mut seen = BTreeSet::new();
    for i in instances {
        if !seen.insert((&i.service, &i.id)) {
            bail!(
                "instance {}/{} is listed twice; give one of them another id",
                i.service,
                i.id
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stands in for the route lookup: 0.0.0.0 is 198.18.0.5, :: is
    /// 2001:db8::5.
    fn own(want: IpAddr) -> anyhow::Result<IpAddr> {
        Ok(if want.is_ipv4() {
            "198.18.0.5".parse()?
        } else {
            "2001:db8::5".parse()?
        })
    }

    fn parse(text: &str) -> Result<Vec<Instance>, (Option<usize>, anyhow::Error)> {
        parse_file(text, &own)
    }

    #[test]
    fn unspecified_addresses_are_this_host() {
        let text = "[[instance]]\nservice = \"a\"\naddr = \"0.0.0.0:11211\"\n[[instance]]\nservice = \"b\"\naddr = \"[::]:80\"\n[instance.check]\ntype = \"http\"\n";
        let v = parse(text).unwrap();
        assert_eq!(v[0].addr, "198.18.0.5:11211".parse().unwrap());
        assert_eq!(
            v[0].check.kind,
            CheckKind::Tcp {
                target: "198.18.0.5:11211".parse().unwrap()
            }
        );
        assert_eq!(v[1].addr, "[2001:db8::5]:80".parse().unwrap());
        assert_eq!(
            v[1].check.kind,
            CheckKind::Http {
                url: "http://[2001:db8::5]:80/".into()
            }
        );
        let none = |_: IpAddr| -> anyhow::Result<IpAddr> { anyhow::bail!("no default route") };
        let (_, e) = parse_file(text, &none).unwrap_err();
        assert!(e.to_string().contains("addr: no default route"), "{e}");
    }

    #[test]
    fn the_contrib_instance_file_is_valid() {
        let v = parse(include_str!("../../../contrib/announce/memcached.toml")).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].service, "memcached");
        assert_eq!(v[0].addr, "198.18.0.5:11211".parse().unwrap());
    }

    #[test]
    fn file_with_defaults_and_all_check_kinds() {
        let text = r#"
[[instance]]
service = "memcached"
addr = "127.0.0.2:11211"

[[instance]]
service = "web"
addr = "127.0.0.3:80"
id = "web-a"
weight = 3
[instance.check]
type = "http"
path = "/health"
interval = "1s"
timeout = "200ms"
rise = 1
fall = 2

[[instance]]
service = "job"
addr = "127.0.0.4:9"
[instance.check]
type = "command"
command = "true"
"#;
        let v = parse(text).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].id, format!("{}-11211", hostname()));
        assert_eq!(
            v[0].check.kind,
            CheckKind::Tcp {
                target: "127.0.0.2:11211".parse().unwrap()
            }
        );
        assert_eq!(v[0].check.interval, DEFAULT_INTERVAL);
        assert_eq!(
            v[1].check.kind,
            CheckKind::Http {
                url: "http://127.0.0.3:80/health".into()
            }
        );
        assert_eq!((v[1].weight, v[1].check.rise, v[1].check.fall), (3, 1, 2));
        assert_eq!(
            v[2].check.kind,
            CheckKind::Command {
                command: "true".into()
            }
        );
    }

    #[test]
    fn errors_name_the_line() {
        let text = "[[instance]]\nservice = \"ok\"\naddr = \"127.0.0.2:1\"\n\n[[instance]]\nservice = \"Bad\"\naddr = \"127.0.0.2:2\"\n";
        let (line, e) = parse(text).unwrap_err();
        assert_eq!(line, Some(5));
        assert!(
            e.to_string().contains("invalid service name \"Bad\""),
            "{e}"
        );

        let text = "[[instance]]\nservice = \"a\"\naddr = \"127.0.0.2:1\"\n[instance.check]\ntimout = \"1s\"\n";
        let (line, e) = parse(text).unwrap_err();
        assert_eq!(line, Some(5));
        assert!(e.to_string().contains("timout"), "{e}");

        let text = "[[instance]]\nservice = \"a\"\naddr = \"127.0.0.2:1\"\n[instance.check]\ninterval = \"soon\"\n";
        let (line, e) = parse(text).unwrap_err();
        assert_eq!(line, Some(5));
        assert!(e.to_string().contains("invalid duration"), "{e}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        let bad = |f: fn(&mut RawInstance)| {
            let mut r = RawInstance {
                service: "svc".into(),
                addr: "127.0.0.2:80".into(),
                ..Default::default()
            };
            f(&mut r);
            r.validate(&own).unwrap_err().to_string()
        };
        assert!(bad(|r| r.addr = "[fe80::1%2]:80".into()).contains("zone"));
        assert!(bad(|r| r.id = Some("a/b".into())).contains("instance id"));
        assert!(bad(|r| r.weight = Some(70_000)).contains("weight"));
        assert!(bad(|r| r.check.kind = Some("icmp".into())).contains("unknown check type"));
        assert!(bad(|r| r.check.kind = Some("command".into())).contains("needs a command"));
        assert!(
            bad(|r| r.check.timeout = Some(Duration::from_secs(5)))
                .contains("at most the interval")
        );
        assert!(bad(|r| r.check.rise = Some(0)).contains("at least 1"));
    }

    #[test]
    fn duplicates_are_rejected() {
        let text = "[[instance]]\nservice = \"a\"\naddr = \"127.0.0.2:1\"\nid = \"x\"\n[[instance]]\nservice = \"a\"\naddr = \"127.0.0.3:1\"\nid = \"x\"\n";
        let (_, e) = parse(text).unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
    }
}
