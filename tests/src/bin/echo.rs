//! A backend for the demo: answers each TCP connection and each UDP
//! datagram with its name.
//!
//! discovery-echo NAME IP:PORT [tcp|udp|both]
fn main() {
    // Serves in whatever namespace it was started in.
    discovery_tests::net::share_host_network();
    let args: Vec<String> = std::env::args().collect();
    let (name, addr) = match (args.get(1), args.get(2)) {
        (Some(n), Some(a)) => (n.clone(), a.parse().expect("IP:PORT")),
        _ => {
            eprintln!("usage: discovery-echo NAME IP:PORT [tcp|udp|both]");
            std::process::exit(2);
        }
    };
    let proto = args.get(3).map(String::as_str).unwrap_or("both");
    let _tcp = (proto != "udp").then(|| discovery_tests::Backend::tcp(&name, addr));
    let _udp = (proto != "tcp").then(|| discovery_tests::Backend::udp(&name, addr));
    loop {
        std::thread::park();
    }
}
