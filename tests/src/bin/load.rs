//! Load generators for `cargo xtask bench`, run inside the bench's cgroup.
//!
//! discovery-load udp-send ADDR MILLIS connected|unconnected
//!     64-byte datagrams as fast as one socket can send them; prints the
//!     number sent.
//! discovery-load reconnect ADDR N
//!     connect() one UDP socket to ADDR N times (the hook's cost without
//!     any packet); prints nanoseconds per connect().
//! discovery-load greet-watch ADDR
//!     TCP connections back to back; prints `<unix ns> <greeting>` whenever
//!     the greeting (the backend's name) differs from the last one, until
//!     killed.
use std::{
    io::{BufRead as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

fn usage() -> ! {
    eprintln!(
        "usage: discovery-load udp-send ADDR MILLIS connected|unconnected | reconnect ADDR N | greet-watch ADDR"
    );
    std::process::exit(2)
}

/// The wildcard of `to`'s family: IPv6 targets (v4-mapped too) get an
/// AF_INET6 socket.
fn any_of(to: SocketAddr) -> SocketAddr {
    match to {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = |s: &str| -> SocketAddr { s.parse().unwrap_or_else(|_| usage()) };
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [_, "udp-send", a, ms, how] => {
            let to = addr(a);
            let s = UdpSocket::bind(any_of(to)).expect("bind");
            let connected = match how {
                "connected" => true,
                "unconnected" => false,
                _ => usage(),
            };
            if connected {
                s.connect(to).expect("connect");
            }
            let buf = [0x5au8; 64];
            let end =
                Instant::now() + Duration::from_millis(ms.parse().unwrap_or_else(|_| usage()));
            let mut sent = 0u64;
            while Instant::now() < end {
                // Check the clock every 256 datagrams only.
                for _ in 0..256 {
                    let r = if connected {
                        s.send(&buf)
                    } else {
                        s.send_to(&buf, to)
                    };
                    if r.is_ok() {
                        sent += 1;
                    }
                }
            }
            println!("{sent}");
        }
        [_, "reconnect", a, n] => {
            let to = addr(a);
            let n: u64 = n.parse().unwrap_or_else(|_| usage());
            let s = UdpSocket::bind(any_of(to)).expect("bind");
            // Warm up (socket storage, caches) before timing.
            for _ in 0..1000 {
                s.connect(to).expect("connect");
            }
            let t = Instant::now();
            for _ in 0..n {
                s.connect(to).expect("connect");
            }
            println!("{:.1}", t.elapsed().as_nanos() as f64 / n as f64);
        }
        [_, "greet-watch", a] => {
            let to = addr(a);
            let mut last = String::new();
            let out = std::io::stdout();
            loop {
                let Ok(s) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) else {
                    continue;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut line = String::new();
                if std::io::BufReader::new(&s).read_line(&mut line).is_err() {
                    continue;
                }
                let name = line.trim();
                if name != last {
                    let ns = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0);
                    let mut o = out.lock();
                    let _ = writeln!(o, "{ns} {name}");
                    let _ = o.flush();
                    last = name.to_owned();
                }
            }
        }
        _ => usage(),
    }
}
