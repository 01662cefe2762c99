//! A real client for tests and the demo: opens connections or sends
//! datagrams to an address and prints one JSON line per attempt.
//!
//! discovery-probe tcp|udp|udp-connected ADDR COUNT
//!   (ADDR `[::ffff:127.0.0.1]:80` or `[::1]:80`: an AF_INET6 socket)
//! discovery-probe load ADDR MILLIS   (TCP connections back to back)
//! discovery-probe hold ADDR COUNT NAME (TCP; connections answered by NAME
//!                                      stay open until the end, like hung
//!                                      requests; the others close at once)
//! discovery-probe idle ADDR  (TCP; one connection left idle: prints its
//!                             socket options, then how it ended)
//! discovery-probe udp-keep ADDR MILLIS connected|unconnected
//!   (one UDP socket for the whole run, as a statsd or syslog client keeps
//!   one: connected once, or sending with sendto; a failed call is printed
//!   and a connected socket connects again, as such clients do)
use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use discovery_tests::{Outcome, now_ms};

/// The wildcard of `addr`'s family: an IPv6 target (v4-mapped ones too)
/// gets an AF_INET6 socket, as a JVM or `socket.AF_INET6` would use.
fn any_of(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
    }
}

fn once(mode: &str, addr: SocketAddr) -> std::io::Result<(String, String)> {
    let timeout = Some(Duration::from_secs(2));
    match mode {
        "tcp" => {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(timeout)?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            Ok((buf.trim().to_owned(), s.peer_addr()?.to_string()))
        }
        "udp" => {
            let s = UdpSocket::bind(any_of(addr))?;
            s.set_read_timeout(timeout)?;
            s.send_to(b"ping", addr)?;
            let mut buf = [0u8; 256];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((
                String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
                from.to_string(),
            ))
        }
        "udp-connected" => {
            let s = UdpSocket::bind(any_of(addr))?;
            s.set_read_timeout(timeout)?;
            s.connect(addr)?;
            s.send(b"ping")?;
            let mut buf = [0u8; 256];
            let n = s.recv(&mut buf)?;
            Ok((
                String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
                s.peer_addr()?.to_string(),
            ))
        }
        other => panic!("unknown mode {other}"),
    }
}

/// `hold` mode: one line per connection, the answering backend's name.
fn hold(addr: SocketAddr, count: usize, name: &str) {
    use std::io::BufRead as _;
    let mut held = Vec::new();
    for _ in 0..count {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        let mut line = String::new();
        std::io::BufReader::new(&s)
            .read_line(&mut line)
            .expect("greeting");
        let got = line.trim().to_owned();
        println!("{got}");
        if got == name {
            held.push(s);
        }
    }
}

fn sockopt(s: &TcpStream, level: i32, opt: i32) -> i32 {
    use std::os::fd::AsRawFd as _;
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket and an int-sized buffer.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            opt,
            std::ptr::from_mut(&mut v).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "getsockopt: {}", std::io::Error::last_os_error());
    v
}

/// `idle` mode: the options the kernel (or its BPF programs) set on the
/// connection, then a blocking read with no timeout of our own: only the
/// connection failing (or the backend closing it) ends it.
fn idle(addr: SocketAddr) {
    use std::io::BufRead as _;
    let s = TcpStream::connect(addr).expect("connect");
    let mut r = std::io::BufReader::new(&s);
    let mut line = String::new();
    r.read_line(&mut line).expect("greeting");
    let opts = serde_json::json!({
        "backend": line.trim(),
        "keepalive": sockopt(&s, libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        "idle": sockopt(&s, libc::SOL_TCP, libc::TCP_KEEPIDLE),
        "interval": sockopt(&s, libc::SOL_TCP, libc::TCP_KEEPINTVL),
        "probes": sockopt(&s, libc::SOL_TCP, libc::TCP_KEEPCNT),
        "user_timeout": sockopt(&s, libc::SOL_TCP, libc::TCP_USER_TIMEOUT),
    });
    println!("{opts}");
    let t = Instant::now();
    let mut rest = Vec::new();
    let errno = match r.read_to_end(&mut rest) {
        Ok(_) => None,
        Err(e) => e.raw_os_error(),
    };
    println!(
        "{}",
        serde_json::json!({"errno": errno, "after_ms": t.elapsed().as_millis() as u64})
    );
}

/// `udp-keep` mode: one socket, one line per ping.
fn udp_keep(addr: SocketAddr, millis: u64, connected: bool) {
    let s = UdpSocket::bind(any_of(addr)).expect("bind");
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    if connected {
        s.connect(addr).expect("connect");
    }
    let start = Instant::now();
    let mut buf = [0u8; 256];
    while start.elapsed() < Duration::from_millis(millis) {
        let at_ms = now_ms();
        let t = Instant::now();
        let r = if connected {
            s.send(b"ping")
                .and_then(|_| s.recv(&mut buf))
                .and_then(|n| Ok((n, s.peer_addr()?)))
        } else {
            s.send_to(b"ping", addr).and_then(|_| s.recv_from(&mut buf))
        };
        let o = match r {
            Ok((n, peer)) => Outcome {
                backend: Some(String::from_utf8_lossy(&buf[..n]).trim().to_owned()),
                peer: Some(peer.to_string()),
                errno: None,
                micros: t.elapsed().as_micros() as u64,
                at_ms,
                error: None,
            },
            Err(e) => {
                if connected {
                    // The socket may have lost its peer: connect again.
                    let _ = s.connect(addr);
                }
                Outcome {
                    backend: None,
                    peer: None,
                    errno: Some(e.raw_os_error().unwrap_or(-1)),
                    micros: t.elapsed().as_micros() as u64,
                    at_ms,
                    error: e.raw_os_error().is_none().then(|| e.to_string()),
                }
            }
        };
        println!("{}", serde_json::to_string(&o).expect("serialise"));
        // A client's pace, not a test's wait: a ping every few ms.
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, mode, addr, millis, how] = &args[..]
        && mode == "udp-keep"
    {
        udp_keep(
            addr.parse().expect("ADDR"),
            millis.parse().expect("MILLIS"),
            how == "connected",
        );
        return;
    }
    if let [_, mode, addr] = &args[..]
        && mode == "idle"
    {
        idle(addr.parse().expect("ADDR"));
        return;
    }
    if let [_, mode, addr, count, name] = &args[..]
        && mode == "hold"
    {
        hold(
            addr.parse().expect("ADDR"),
            count.parse().expect("COUNT"),
            name,
        );
        return;
    }
    let [_, mode, addr, count] = &args[..] else {
        eprintln!("usage: discovery-probe tcp|udp|udp-connected ADDR COUNT");
        std::process::exit(2);
    };
    let addr: SocketAddr = addr.parse().expect("ADDR is ip:port");
    let count: u64 = count.parse().expect("COUNT is a number");
    let start = Instant::now();
    let mut i = 0;
    loop {
        let done = if mode == "load" {
            start.elapsed() >= Duration::from_millis(count)
        } else {
            i >= count
        };
        if done {
            break;
        }
        i += 1;
        let at_ms = now_ms();
        let t = Instant::now();
        let o = match once(if mode == "load" { "tcp" } else { mode }, addr) {
            Ok((backend, peer)) => Outcome {
                backend: Some(backend),
                peer: Some(peer),
                errno: None,
                micros: t.elapsed().as_micros() as u64,
                at_ms,
                error: None,
            },
            Err(e) => Outcome {
                backend: None,
                peer: None,
                errno: Some(e.raw_os_error().unwrap_or(-1)),
                micros: t.elapsed().as_micros() as u64,
                at_ms,
                error: e.raw_os_error().is_none().then(|| e.to_string()),
            },
        };
        println!("{}", serde_json::to_string(&o).expect("serialise"));
    }
}
