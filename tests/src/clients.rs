//! Real clients other than `discovery-probe`, run inside a test cgroup as
//! the programs a node runs would be: the JVM's and Python's AF_INET6
//! sockets, curl and dig; and the servers they talk to (an HTTP backend, a
//! dnsmasq).
//!
//! - [`java`]: `tests/clients/Probe.java` (compiled once per test process
//!   with `javac`), default JVM sockets: AF_INET6, dual stack, an IPv4
//!   destination connected to as `::ffff:a.b.c.d`. The JVM turns every
//!   v4-mapped address into an IPv4 one, so its `peer` never reads
//!   `[::ffff:..]`; and for tcp and udp-connected `peer` is the address it
//!   was asked to connect to (the JVM caches it and never calls
//!   getpeername), only udp's is the reply's real source.
//! - [`python6`]: `tests/clients/probe6.py`, explicit `AF_INET6` sockets,
//!   optionally `IPV6_V6ONLY`; `peer` is getpeername()/recvfrom() as the
//!   kernel reports it, `[::ffff:a.b.c.d]:port` for v4-mapped.
//! - [`curl`]: curl 7.88 (Debian 12) resolves `localhost` itself, to
//!   127.0.0.1 and ::1 whatever /etc/hosts says, and tries 127.0.0.1 first;
//!   ::1 when 127.0.0.1 fails (refused at once, or after its 200 ms happy
//!   eyeballs delay when the SYN goes unanswered).
//! - [`dig`]: bind9's dig 9.18: one connected UDP socket (bound to the
//!   wildcard of the server's family, then connect()), so only replies from
//!   the address it connected to reach it. It refuses a v4-mapped server
//!   address outright (";; Skipping mapped address").
//!
//! Each helper's outputs are what the client itself reports: a test judges
//! redirection by the backend's name (or the DNS answer), and reverse
//! translation by the `peer`/`from` the client saw.
use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::{Outcome, TestCgroup, net, wait_until};

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// The path of `bin` on PATH, or a panic naming it and what installs it.
pub fn require(bin: &str, install: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{bin}` not found on PATH: {install} (`cargo xtask bootstrap` installs it)")
        })
}

/// A client's JSON lines; panics with its stderr if it failed.
fn outcomes(what: &str, out: &Output) -> Vec<Outcome> {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{what} printed {l:?}: {e}")))
        .collect()
}

// -------------------------------------------------------------------- java

/// The directory holding `Probe.class`, compiled at most once per test
/// process: into `target/clients/java-HASH`, HASH of the source, so test
/// binaries running at once share one and an edit compiles afresh.
fn java_classes() -> &'static Path {
    static CLASSES: OnceLock<PathBuf> = OnceLock::new();
    CLASSES.get_or_init(|| {
        use std::hash::{Hash as _, Hasher as _};
        let src = clients_dir().join("Probe.java");
        let text = fs::read(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        let mut h = std::hash::DefaultHasher::new();
        text.hash(&mut h);
        let base = crate::workspace_target().join("clients");
        let dir = base.join(format!("java-{:016x}", h.finish()));
        if dir.join("Probe.class").is_file() {
            return dir;
        }
        let javac = require(
            "javac",
            "the Java client needs a JDK (Debian: openjdk-17-jdk-headless)",
        );
        fs::create_dir_all(&base).unwrap_or_else(|e| panic!("create {}: {e}", base.display()));
        let tmp = tempfile::tempdir_in(&base).expect("javac output dir");
        let out = Command::new(javac)
            .arg("-d")
            .arg(tmp.path())
            .arg(&src)
            .output()
            .expect("run javac");
        assert!(
            out.status.success(),
            "javac {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        // Whole or not at all; if another process got there first, its
        // classes are the same.
        let tmp = tmp.keep();
        if fs::rename(&tmp, &dir).is_err() {
            let _ = fs::remove_dir_all(&tmp);
            assert!(
                dir.join("Probe.class").is_file(),
                "no Probe.class in {}",
                dir.display()
            );
        }
        dir
    })
}

/// Runs `Probe tcp|udp|udp-connected HOST PORT N` on the JVM in `cg`.
/// HOST is any literal the JVM parses: `127.0.0.1`, `::1`,
/// `::ffff:127.0.0.1` (which the JVM treats as 127.0.0.1).
pub fn java(cg: &TestCgroup, mode: &str, host: &str, port: u16, n: usize) -> Vec<Outcome> {
    let classes = java_classes();
    let java = require(
        "java",
        "the Java client needs a JVM (Debian: openjdk-17-jdk-headless)",
    );
    let out = cg.output(
        Command::new(java)
            // Faster start on small machines; sockets are the defaults.
            .args(["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-cp"])
            .arg(classes)
            .args(["Probe", mode, host, &port.to_string(), &n.to_string()]),
    );
    outcomes(&format!("java Probe {mode} {host} {port}"), &out)
}

// ------------------------------------------------------------------ python

/// Runs `probe6.py [--v6only] MODE ADDR PORT N` in `cg`: AF_INET6 sockets,
/// ADDR an IPv6 literal (`::1`, `::ffff:127.0.0.1`).
pub fn python6(
    cg: &TestCgroup,
    mode: &str,
    addr: &str,
    port: u16,
    n: usize,
    v6only: bool,
) -> Vec<Outcome> {
    let python = require("python3", "the Python client needs python3");
    let mut cmd = Command::new(python);
    cmd.arg(clients_dir().join("probe6.py"));
    if v6only {
        cmd.arg("--v6only");
    }
    cmd.args([mode, addr, &port.to_string(), &n.to_string()]);
    let out = cg.output(&mut cmd);
    outcomes(&format!("probe6.py {mode} {addr} {port}"), &out)
}

// -------------------------------------------------------------------- curl

/// What `curl` got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http {
    /// The HTTP status; 0 when there was no response.
    pub status: u16,
    pub body: String,
    /// `%{remote_ip}`: the address curl connected to (the one it dialled,
    /// `127.0.0.1` or `::1` for `localhost`), empty if none.
    pub remote_ip: String,
    /// curl's exit code: 0, or 7 (could not connect), 28 (timed out)...
    pub exit: Option<i32>,
    pub stderr: String,
}

/// The marker between the body and curl's `--write-out`.
const CURL_MARK: &str = "\n--discovery-curl--";

/// `curl -sS --max-time 5 URL` in `cg`.
pub fn curl(cg: &TestCgroup, url: &str) -> Http {
    curl_with(cg, &[], url)
}

/// `curl -sS --max-time 5 ARGS... URL` in `cg` (`-4`, `-6`,
/// `--resolve`...).
pub fn curl_with(cg: &TestCgroup, args: &[&str], url: &str) -> Http {
    let curl = require("curl", "the HTTP client is curl");
    let out = cg.output(
        Command::new(curl)
            .args(["-sS", "--max-time", "5", "--write-out"])
            .arg(format!("{CURL_MARK}%{{http_code}} %{{remote_ip}}"))
            .args(args)
            .arg(url),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, tail) = stdout.rsplit_once(CURL_MARK).unwrap_or((&stdout, ""));
    let mut tail = tail.split(' ');
    Http {
        status: tail.next().and_then(|s| s.parse().ok()).unwrap_or(0),
        body: body.to_owned(),
        remote_ip: tail.next().unwrap_or("").to_owned(),
        exit: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A tiny HTTP/1.1 server: every request gets `200` with the body
/// `NAME\n`, and the connection is closed. Remembers each client's
/// address as accepted.
pub struct HttpBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpBackend {
    pub fn start(name: &str, addr: SocketAddr) -> Self {
        net::isolate();
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind http {addr}: {e}"));
        let addr = l.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, n, name) = (stop.clone(), seen.clone(), name.to_owned());
        let thread = thread::spawn(move || {
            for c in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(c) = c else { continue };
                if let Ok(p) = c.peer_addr() {
                    n.lock().expect("seen").push(p);
                }
                let name = name.clone();
                thread::spawn(move || answer(c, &name));
            }
        });
        Self {
            addr,
            stop,
            seen,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The client addresses of the connections so far.
    pub fn seen(&self) -> Vec<SocketAddr> {
        self.seen.lock().expect("seen").clone()
    }
}

/// Reads one request's head and answers it.
fn answer(mut c: TcpStream, name: &str) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("{name}\n");
    let _ = c.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocked accept; the test runner is not redirected.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// --------------------------------------------------------------------- dns

/// What `dig` got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dig {
    /// The response's status (`NOERROR`, `NXDOMAIN`, `REFUSED`...); None
    /// when no response was accepted.
    pub status: Option<String>,
    /// The answer section's data, in order (`10.0.0.1`, `fd00::1`).
    pub answers: Vec<String>,
    /// The server dig reports the answer came from (`;; SERVER:`), as
    /// `ip:port` / `[ip6]:port`.
    pub from: Option<String>,
    /// dig's `;;` complaints: timeouts, refusals, unexpected sources,
    /// skipped addresses.
    pub errors: Vec<String>,
    /// dig's exit code: 0, or 9 when no server answered.
    pub exit: Option<i32>,
    /// All of dig's output, for failure messages.
    pub output: String,
}

/// `dig @SERVER -p PORT NAME +tries=1 +time=2` in `cg` (an A query; see
/// [`dig_type`]).
pub fn dig(cg: &TestCgroup, server: &str, port: u16, name: &str) -> Dig {
    dig_type(cg, server, port, name, "A")
}

/// `dig @SERVER -p PORT NAME TYPE +tries=1 +time=2` in `cg`. The full
/// output, not `+short`: that is where the status and `;; SERVER:` are.
pub fn dig_type(cg: &TestCgroup, server: &str, port: u16, name: &str, rtype: &str) -> Dig {
    let dig = require("dig", "the DNS client is dig (Debian: bind9-dnsutils)");
    let out = cg.output(Command::new(dig).arg(format!("@{server}")).args([
        "-p",
        &port.to_string(),
        name,
        rtype,
        "+tries=1",
        "+time=2",
    ]));
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_dig(&output, out.status.code())
}

fn parse_dig(output: &str, exit: Option<i32>) -> Dig {
    let mut d = Dig {
        status: None,
        answers: Vec::new(),
        from: None,
        errors: Vec::new(),
        exit,
        output: output.to_owned(),
    };
    let mut in_answer = false;
    for l in output.lines() {
        if l.trim().is_empty() {
            in_answer = false;
        } else if l.starts_with(";; ANSWER SECTION:") {
            in_answer = true;
        } else if in_answer && !l.starts_with(';') {
            // "web.test.		0	IN	A	10.1.2.3"
            let data: Vec<&str> = l.split_whitespace().skip(4).collect();
            if !data.is_empty() {
                d.answers.push(data.join(" "));
            }
        } else if let Some(h) = l.strip_prefix(";; ->>HEADER<<-") {
            d.status = h
                .split(',')
                .find_map(|f| f.trim().strip_prefix("status: "))
                .map(str::to_owned);
        } else if let Some(s) = l.strip_prefix(";; SERVER: ") {
            // "127.0.0.2#5353(127.0.0.2) (UDP)", "::1#5353(::1) (UDP)"
            d.from = s.split('(').next().and_then(|a| {
                let (ip, port) = a.trim().rsplit_once('#')?;
                let ip: IpAddr = ip.parse().ok()?;
                Some(SocketAddr::new(ip, port.parse().ok()?).to_string())
            });
        } else if l.starts_with(";; ")
            && [
                "error",
                "timed out",
                "unexpected",
                "Skipping",
                "no servers",
                "No acceptable",
            ]
            .iter()
            .any(|w| l.contains(w))
        {
            d.errors.push(l.trim_start_matches(";; ").to_owned());
        }
    }
    d
}

/// A private dnsmasq: a real DNS server on one address and port, answering
/// only the records it was given (no upstream, no /etc/hosts), logging
/// each query and its source. Killed by PID on drop.
pub struct Dnsmasq {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Serves `records` (a name and an address each: an A record for IPv4,
    /// AAAA for IPv6; a name may repeat) on `addr` (UDP and TCP). Port 0
    /// picks a free one. Returns once it answers.
    pub fn start(addr: SocketAddr, records: &[(&str, IpAddr)]) -> Self {
        Self::spawn(addr, records, None)
    }

    /// A caching-off forwarder on `addr` whose one upstream is `upstream`
    /// (a frontend), run inside `cg` so its queries are redirected: the
    /// resolver of a node pointed at a service. Returns once it answers
    /// (through the upstream).
    pub fn forwarder(addr: SocketAddr, upstream: SocketAddr, cg: &crate::TestCgroup) -> Self {
        Self::spawn(addr, &[], Some((upstream, cg)))
    }

    fn spawn(
        addr: SocketAddr,
        records: &[(&str, IpAddr)],
        forward: Option<(SocketAddr, &crate::TestCgroup)>,
    ) -> Self {
        net::isolate();
        let dnsmasq = require(
            "dnsmasq",
            "the DNS server is dnsmasq (Debian: dnsmasq-base)",
        );
        // A port found free can be taken before dnsmasq binds it.
        let want = addr;
        for _ in 0..3 {
            let addr = if want.port() == 0 {
                SocketAddr::new(want.ip(), free_udp_tcp_port(want.ip()))
            } else {
                want
            };
            let dir = tempfile::tempdir().expect("dnsmasq dir");
            let log = fs::File::create(dir.path().join("dnsmasq.log")).expect("dnsmasq log");
            let mut cmd = Command::new(&dnsmasq);
            cmd.process_group(0)
                .args(["--no-daemon", "--conf-file=/dev/null", "--pid-file="])
                .args(["--port", &addr.port().to_string()])
                .args(["--listen-address", &addr.ip().to_string()])
                .args(["--bind-interfaces", "--no-resolv", "--no-hosts"])
                .args(["--log-facility=-", "--log-queries", "--cache-size=0"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log);
            for (name, ip) in records {
                cmd.arg(format!("--address=/{name}/{ip}"));
            }
            let child = match forward {
                Some((up, cg)) => {
                    cmd.arg(format!("--server={}#{}", up.ip(), up.port()));
                    cg.spawn(&mut cmd)
                }
                None => cmd.spawn().expect("start dnsmasq"),
            };
            let mut d = Self {
                child: Some(child),
                addr,
                dir,
            };
            if d.wait_ready() {
                return d;
            }
            if want.port() != 0 {
                // A fixed port: nothing else to try.
                panic!("dnsmasq on {addr} exited:\n{}", d.log());
            }
        }
        panic!("dnsmasq did not start in 3 attempts");
    }

    /// Waits until it answers a query; false if it exited.
    fn wait_ready(&mut self) -> bool {
        let r = wait_until(Duration::from_secs(10), || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                return Some(false);
            }
            dns_answers(self.addr).then_some(true)
        });
        match r {
            Some(true) => true,
            Some(false) => {
                self.child = None;
                false
            }
            None => panic!("dnsmasq on {} never answered:\n{}", self.addr, self.log()),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its log: one `query[A] NAME from SOURCE` line per query.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }

    /// The sources of the queries it logged, in order (`127.0.0.1`, `::1`).
    pub fn query_sources(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(": query["))
            .filter_map(|l| l.rsplit_once(" from ").map(|(_, s)| s.trim().to_owned()))
            .collect()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A port free for both UDP and TCP on `ip`.
fn free_udp_tcp_port(ip: IpAddr) -> u16 {
    for _ in 0..20 {
        let u = UdpSocket::bind(SocketAddr::new(ip, 0)).expect("bind an ephemeral UDP port");
        let port = u.local_addr().expect("local addr").port();
        if TcpListener::bind(SocketAddr::new(ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on {ip}");
}

/// Whether a DNS server on `addr` answers a query (any answer) within
/// 200 ms. From the test runner, which is not redirected.
fn dns_answers(addr: SocketAddr) -> bool {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("addr")
    } else {
        "[::]:0".parse().expect("addr")
    };
    let Ok(s) = UdpSocket::bind(local) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    // id 0x5eed, RD, one question: "ready.invalid. IN A".
    let mut q = vec![0x5e, 0xed, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["ready", "invalid"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if s.send_to(&q, addr).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(s.recv_from(&mut buf), Ok((n, from)) if n >= 2 && buf[..2] == q[..2] && from == addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dig_output() {
        let out = "\n; <<>> DiG 9.18.49-1~deb12u3-Debian <<>> @::1 -p 5353 web.test\n\
                   ;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 29844\n\
                   ;; flags: qr aa rd ra; QUERY: 1, ANSWER: 2, AUTHORITY: 0, ADDITIONAL: 1\n\n\
                   ;; QUESTION SECTION:\n;web.test.\t\t\tIN\tA\n\n\
                   ;; ANSWER SECTION:\nweb.test.\t\t0\tIN\tA\t10.1.2.3\n\
                   web.test.\t\t0\tIN\tA\t10.1.2.4\n\n\
                   ;; Query time: 0 msec\n;; SERVER: ::1#5353(::1) (UDP)\n";
        let d = parse_dig(out, Some(0));
        assert_eq!(d.status.as_deref(), Some("NOERROR"));
        assert_eq!(d.answers, ["10.1.2.3", "10.1.2.4"]);
        assert_eq!(d.from.as_deref(), Some("[::1]:5353"));
        assert!(d.errors.is_empty());

        let d = parse_dig(
            ";; communications error to 127.0.0.9#5353: connection refused\n\n\
             ;; no servers could be reached\n",
            Some(9),
        );
        assert_eq!((d.status, d.from), (None, None));
        assert_eq!(
            d.errors,
            [
                "communications error to 127.0.0.9#5353: connection refused",
                "no servers could be reached"
            ]
        );
    }
}
