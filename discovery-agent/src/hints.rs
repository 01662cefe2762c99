//! Friendly errors on etcd values: a field the contract does not know is
//! ignored (the value still applies, so a newer writer does not break an
//! older agent), but it is reported once per key with the field the writer
//! probably meant: a close spelling, or the contract's word for HAProxy's
//! (`balance` is `policy` here, `inter` is `interval`).
use serde_json::Value;

use crate::schema::{BACKEND_FIELDS, CHECK_FIELDS, SERVICE_FIELDS};

/// An ignored field and what was probably meant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ignored {
    /// Its path in the value: `balance`, `check.inter`.
    pub field: String,
    pub suggestion: Option<&'static str>,
}

impl std::fmt::Display for Ignored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.suggestion {
            Some(s) => write!(f, "{} (did you mean {s}?)", self.field),
            None => write!(f, "{}", self.field),
        }
    }
}

/// Words of HAProxy (and of other tools' configs) for fields the contract
/// names otherwise: (their word, ours), per object.
const SERVICE_SYNONYMS: &[(&str, &str)] = &[
    ("balance", "policy"),
    ("lb", "policy"),
    ("lb_policy", "policy"),
    ("algorithm", "policy"),
    ("mode", "protocol"),
    ("proto", "protocol"),
    ("bind", "frontend"),
    ("frontends", "frontend"),
    ("listen", "frontend"),
    ("timeout_connect", "connect_timeout"),
    ("timeout-connect", "connect_timeout"),
    ("connect-timeout", "connect_timeout"),
    ("tcp_user_timeout", "user_timeout"),
    ("health_check", "check"),
    ("healthcheck", "check"),
    ("health", "check"),
    ("tcpka", "keepalive"),
    ("keep_alive", "keepalive"),
    ("keep-alive", "keepalive"),
    ("on-marked-down", "shutdown_sessions"),
    ("on_marked_down", "shutdown_sessions"),
    ("shutdown-sessions", "shutdown_sessions"),
];
const CHECK_SYNONYMS: &[(&str, &str)] = &[
    ("inter", "interval"),
    ("kind", "type"),
    ("uri", "path"),
    ("url", "path"),
    ("http_path", "path"),
    ("httpchk", "path"),
    ("timeout_check", "timeout"),
];
const BACKEND_SYNONYMS: &[(&str, &str)] = &[
    ("address", "addr"),
    ("server", "addr"),
    ("ip", "addr"),
    ("host", "addr"),
];

/// What a writer probably meant by `field`: a synonym, else a known field
/// at most two edits away.
fn suggest(
    field: &str,
    known: &[&'static str],
    synonyms: &[(&str, &'static str)],
) -> Option<&'static str> {
    let lower = field.to_ascii_lowercase();
    if let Some((_, ours)) = synonyms.iter().find(|(theirs, _)| *theirs == lower) {
        return Some(ours);
    }
    known
        .iter()
        .map(|k| (strsim::levenshtein(&lower, k), *k))
        .filter(|(d, k)| *d <= 2 && *d < k.len())
        .min()
        .map(|(_, k)| k)
}

fn unknown(
    obj: &serde_json::Map<String, Value>,
    prefix: &str,
    known: &[&'static str],
    synonyms: &[(&str, &'static str)],
    out: &mut Vec<Ignored>,
) {
    for field in obj.keys().filter(|k| !known.contains(&k.as_str())) {
        out.push(Ignored {
            field: format!("{prefix}{field}"),
            suggestion: suggest(field, known, synonyms),
        });
    }
}

/// The ignored fields of a service value (none if it is not a JSON object;
/// a value that does not parse is reported as invalid elsewhere).
pub fn ignored_in_service(value: &[u8]) -> Vec<Ignored> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(value) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    unknown(&obj, "", SERVICE_FIELDS, SERVICE_SYNONYMS, &mut out);
    if let Some(Value::Object(check)) = obj.get("check") {
        unknown(check, "check.", CHECK_FIELDS, CHECK_SYNONYMS, &mut out);
    }
    out
}

/// The ignored fields of a backend value in its JSON form.
pub fn ignored_in_backend(value: &[u8]) -> Vec<Ignored> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(value) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    unknown(&obj, "", BACKEND_FIELDS, BACKEND_SYNONYMS, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{BackendJson, CheckJson, FrontendJson, KeepaliveJson, ServiceJson};

    fn fields(v: &impl serde::Serialize) -> Vec<String> {
        let Value::Object(o) = serde_json::to_value(v).unwrap() else {
            panic!("an object")
        };
        let mut k: Vec<String> = o.keys().cloned().collect();
        k.sort();
        k
    }

    fn sorted(l: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = l.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn the_field_lists_are_the_structs() {
        let check = CheckJson {
            kind: "tcp".into(),
            path: Some("/".into()),
            interval: "1s".into(),
            timeout: "1s".into(),
            rise: 1,
            fall: 1,
        };
        let svc = ServiceJson {
            frontend: FrontendJson::One("127.0.0.1:1".into()),
            protocol: crate::schema::Protocol::Tcp,
            policy: crate::schema::Policy::Consistent,
            check: Some(check.clone()),
            connect_timeout: Some("1s".into()),
            user_timeout: Some("1s".into()),
            keepalive: Some(KeepaliveJson {
                idle: "1s".into(),
                interval: None,
                probes: None,
            }),
            takeover: true,
            shutdown_sessions: true,
        };
        assert_eq!(fields(&svc), sorted(SERVICE_FIELDS));
        assert_eq!(fields(&check), sorted(CHECK_FIELDS));
        let b = BackendJson {
            addr: "127.0.0.2:1".into(),
            weight: 1,
        };
        assert_eq!(fields(&b), sorted(BACKEND_FIELDS));
    }

    #[test]
    fn haproxy_words_and_typos_get_a_suggestion() {
        let v = br#"{"frontend":"127.0.0.1:80","balance":"consistent","polcy":"random",
                    "check":{"type":"tcp","inter":"1s"},"colour":"blue"}"#;
        let mut got = ignored_in_service(v);
        got.sort();
        let want = [
            ("balance", Some("policy")),
            ("check.inter", Some("interval")),
            ("colour", None),
            ("polcy", Some("policy")),
        ];
        assert_eq!(
            got.iter()
                .map(|i| (i.field.as_str(), i.suggestion))
                .collect::<Vec<_>>(),
            want
        );
        assert_eq!(got[0].to_string(), "balance (did you mean policy?)");
        assert!(ignored_in_service(br#"{"frontend":"127.0.0.1:80"}"#).is_empty());
        assert!(ignored_in_service(b"not json").is_empty());
        let b = ignored_in_backend(br#"{"address":"127.0.0.2:80","weight":1}"#);
        assert_eq!(b[0].suggestion, Some("addr"));
        assert!(ignored_in_backend(b"127.0.0.2:80").is_empty());
    }
}
