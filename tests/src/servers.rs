//! Small real TCP servers and clients for tests and the demo, running inside pod namespaces.
use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use crate::Netns;

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A server in `ns` on `addr` that greets each connection with "peer=<ip> server=<name>\n" and
/// then echoes what it receives until EOF. Returns the peers it saw.
pub fn greeter(ns: &Netns, addr: SocketAddr, name: &'static str) -> Arc<Mutex<Vec<IpAddr>>> {
    let listener = ns.run(move || TcpListener::bind(addr).expect("bind server"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let peer = conn.peer_addr().expect("peer").ip();
            s2.lock().expect("lock").push(peer);
            thread::spawn(move || {
                let _ = writeln!(conn, "peer={peer} server={name}");
                let mut buf = [0u8; 16384];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    seen
}

/// Connects from `ns` to `addr` and returns the greeting line.
pub fn greeting(ns: &Netns, addr: SocketAddr) -> std::io::Result<String> {
    let mut s = ns.run(move || TcpStream::connect_timeout(&addr, TIMEOUT))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b)? == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    s.shutdown(Shutdown::Write)?;
    Ok(String::from_utf8_lossy(&line).into_owned())
}
