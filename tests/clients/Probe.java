// A JVM client for the integration tests: discovery-probe's modes and
// output, over the JVM's own sockets.
//
//   java Probe.java tcp|udp|udp-connected HOST PORT COUNT
//
// One JSON line per attempt, like discovery-probe: {"backend", "peer",
// "errno", "micros", "at_ms"}, plus "error" (the exception) on failure.
//
// Default JVM socket behaviour (no -Djava.net.preferIPv4Stack): on a host
// with IPv6 every socket is AF_INET6 and dual stack, and an IPv4
// destination is connected to, or sent to, as its v4-mapped address
// ::ffff:a.b.c.d. These are the calls the redirector must see through.
//
// What "peer" is, and how the JVM shows it:
// - tcp and udp-connected: getRemoteSocketAddress(). The JVM records the
//   address it was asked to connect to; it does not call getpeername(), so
//   this is the address the program asked for (the frontend), whatever
//   the kernel connected the socket to.
// - udp: the source address of the reply (recvfrom), as the kernel gave
//   it: this is what shows whether replies are translated back.
// - The JVM has no v4-mapped Inet6Address: it turns ::ffff:a.b.c.d into
//   an Inet4Address everywhere (parsing HOST, and every address the kernel
//   returns), so a v4-mapped peer is printed as a.b.c.d:port, never
//   [::ffff:a.b.c.d]:port. Other IPv6 addresses are printed as Rust
//   prints a SocketAddr: [::1]:port (RFC 5952 compression, lowercase).
import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.net.DatagramPacket;
import java.net.DatagramSocket;
import java.net.Inet4Address;
import java.net.Inet6Address;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.NoRouteToHostException;
import java.net.PortUnreachableException;
import java.net.Socket;
import java.net.SocketAddress;
import java.net.SocketTimeoutException;
import java.nio.charset.StandardCharsets;

public class Probe {
    static final int CONNECT_TIMEOUT_MS = 5000;
    static final int READ_TIMEOUT_MS = 2000;

    /** strerror() texts the JVM puts in its exception messages. */
    static final Object[][] ERRNOS = {
        {"Connection refused", 111},
        {"Network is unreachable", 101},
        {"Operation not permitted", 1},
        {"No route to host", 113},
        {"Connection timed out", 110},
        {"Connection reset", 104},
        {"Permission denied", 13},
        {"Address already in use", 98},
        {"Cannot assign requested address", 99},
        {"Address family not supported", 97},
        {"Invalid argument", 22},
        {"Broken pipe", 32},
    };

    static Integer errno(Throwable e) {
        // The JVM's own timeouts (connect, read) count as ETIMEDOUT; the
        // "error" field tells them from the kernel's ("Connection timed out").
        if (e instanceof SocketTimeoutException) return 110;
        if (e instanceof PortUnreachableException) return 111;
        if (e instanceof NoRouteToHostException) return 113;
        String m = String.valueOf(e.getMessage());
        for (Object[] kv : ERRNOS) {
            if (m.contains((String) kv[0])) return (Integer) kv[1];
        }
        return null;
    }

    static String[] tcp(InetAddress host, int port) throws IOException {
        try (Socket s = new Socket()) {
            s.connect(new InetSocketAddress(host, port), CONNECT_TIMEOUT_MS);
            s.setSoTimeout(READ_TIMEOUT_MS);
            BufferedReader r = new BufferedReader(
                new InputStreamReader(s.getInputStream(), StandardCharsets.UTF_8));
            String line = r.readLine();
            return new String[] {line == null ? "" : line.trim(), peer(s.getRemoteSocketAddress())};
        }
    }

    static String[] udp(InetAddress host, int port, boolean connected) throws IOException {
        try (DatagramSocket s = new DatagramSocket()) {
            s.setSoTimeout(READ_TIMEOUT_MS);
            byte[] ping = "ping".getBytes(StandardCharsets.UTF_8);
            InetSocketAddress to = new InetSocketAddress(host, port);
            if (connected) {
                s.connect(to);
                s.send(new DatagramPacket(ping, ping.length));
            } else {
                s.send(new DatagramPacket(ping, ping.length, to));
            }
            byte[] buf = new byte[512];
            DatagramPacket p = new DatagramPacket(buf, buf.length);
            s.receive(p);
            String name = new String(buf, 0, p.getLength(), StandardCharsets.UTF_8).trim();
            return new String[] {name, peer(connected ? s.getRemoteSocketAddress() : p.getSocketAddress())};
        }
    }

    /** ip:port, or [ip6]:port as Rust's SocketAddr Display prints it. */
    static String peer(SocketAddress sa) {
        if (!(sa instanceof InetSocketAddress)) return String.valueOf(sa);
        InetSocketAddress isa = (InetSocketAddress) sa;
        InetAddress a = isa.getAddress();
        if (a == null) return isa.getHostString() + ":" + isa.getPort();
        if (a instanceof Inet4Address) return a.getHostAddress() + ":" + isa.getPort();
        Inet6Address a6 = (Inet6Address) a;
        String s = v6(a6.getAddress());
        if (a6.getScopeId() != 0) s += "%" + a6.getScopeId();
        return "[" + s + "]:" + isa.getPort();
    }

    /** RFC 5952 text, as Rust's Ipv6Addr Display. */
    static String v6(byte[] b) {
        int[] seg = new int[8];
        for (int i = 0; i < 8; i++) seg[i] = ((b[2 * i] & 0xff) << 8) | (b[2 * i + 1] & 0xff);
        if (seg[0] == 0 && seg[1] == 0 && seg[2] == 0 && seg[3] == 0 && seg[4] == 0 && seg[5] == 0xffff) {
            return "::ffff:" + (b[12] & 0xff) + "." + (b[13] & 0xff) + "." + (b[14] & 0xff) + "." + (b[15] & 0xff);
        }
        // The first longest run of two or more zero segments becomes "::".
        int best = -1, bestLen = 1;
        for (int i = 0; i < 8; ) {
            if (seg[i] != 0) { i++; continue; }
            int j = i;
            while (j < 8 && seg[j] == 0) j++;
            if (j - i > bestLen) { best = i; bestLen = j - i; }
            i = j;
        }
        StringBuilder sb = new StringBuilder();
        for (int i = 0; i < 8; i++) {
            if (i == best) {
                sb.append("::");
                i += bestLen - 1;
                continue;
            }
            if (sb.length() > 0 && sb.charAt(sb.length() - 1) != ':') sb.append(':');
            sb.append(Integer.toHexString(seg[i]));
        }
        return sb.toString();
    }

    static String json(String s) {
        if (s == null) return "null";
        StringBuilder sb = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"': sb.append("\\\""); break;
                case '\\': sb.append("\\\\"); break;
                case '\n': sb.append("\\n"); break;
                case '\r': sb.append("\\r"); break;
                case '\t': sb.append("\\t"); break;
                default:
                    if (c < 0x20) sb.append(String.format("\\u%04x", (int) c));
                    else sb.append(c);
            }
        }
        return sb.append('"').toString();
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 4) {
            System.err.println("usage: java Probe tcp|udp|udp-connected HOST PORT COUNT");
            System.exit(2);
        }
        String mode = args[0];
        if (!mode.equals("tcp") && !mode.equals("udp") && !mode.equals("udp-connected")) {
            System.err.println("unknown mode " + mode);
            System.exit(2);
        }
        // A literal (v4, v6 or v4-mapped) is parsed, not looked up.
        InetAddress host = InetAddress.getByName(args[1]);
        int port = Integer.parseInt(args[2]);
        int count = Integer.parseInt(args[3]);
        for (int i = 0; i < count; i++) {
            long atMs = System.currentTimeMillis();
            long t = System.nanoTime();
            String[] got = null;
            Throwable err = null;
            try {
                got = mode.equals("tcp") ? tcp(host, port) : udp(host, port, mode.equals("udp-connected"));
            } catch (IOException | RuntimeException e) {
                err = e;
            }
            long micros = (System.nanoTime() - t) / 1000;
            StringBuilder o = new StringBuilder("{");
            o.append("\"backend\":").append(json(got == null ? null : got[0]));
            o.append(",\"peer\":").append(json(got == null ? null : got[1]));
            Integer errno = err == null ? null : errno(err);
            o.append(",\"errno\":").append(errno == null ? "null" : errno.toString());
            o.append(",\"micros\":").append(micros);
            o.append(",\"at_ms\":").append(atMs);
            if (err != null) o.append(",\"error\":").append(json(err.toString()));
            o.append('}');
            System.out.println(o);
        }
        System.out.flush();
    }
}
