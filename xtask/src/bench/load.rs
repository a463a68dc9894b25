//! Load generators and what they report: wrk, h2load and iperf3 (run in the client pod and
//! parsed), and two clients written here: an open-loop constant-rate HTTP/1.1 client and a
//! new-connection-per-request one.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::Netns;

/// What a wrk run reports.
#[derive(Debug, Clone, Copy)]
pub struct Wrk {
    pub rps: f64,
    pub requests: u64,
    pub p99_us: f64,
}

/// `wrk -t 2 -c conns` for `secs` against `url` in `ns`; fails on any non-2xx response or
/// connect/timeout error (a proxy answering 502 fast is not a fast proxy).
pub fn wrk(ns: &Netns, url: &str, conns: u32, secs: f64) -> anyhow::Result<Wrk> {
    let out = ns
        .cmd("wrk")
        .args(["-t", "2", "-c", &conns.to_string()])
        .arg("-d")
        .arg(format!("{}s", secs.max(1.0).round()))
        .args(["--latency", url])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text)
}

fn parse_wrk(text: &str) -> anyhow::Result<Wrk> {
    if let Some(l) = text
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses"))
    {
        bail!("wrk: {}", l.trim());
    }
    if let Some(l) = text.lines().find(|l| l.contains("Socket errors")) {
        // A read error is wrk seeing the connection close at the end of the run; connect
        // errors and timeouts are the proxy failing.
        let count = |what: &str| {
            l.split(',')
                .find_map(|p| {
                    p.trim()
                        .trim_start_matches("Socket errors:")
                        .trim()
                        .strip_prefix(what)
                })
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        if count("connect") > 0 || count("timeout") > 0 {
            bail!("wrk: {}", l.trim());
        }
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's report:\n{text}"))?;
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no request count in wrk's report:\n{text}"))?;
    let p99_us = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| duration_us(v.trim()))
        .with_context(|| format!("no 99% latency in wrk's report:\n{text}"))?;
    Ok(Wrk {
        rps,
        requests,
        p99_us,
    })
}

/// wrk's `1.23ms`, `456.00us`, `1.02s` in microseconds.
fn duration_us(v: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|n| n * mult)
}

/// What one `h2load` run measured.
pub struct H2load {
    pub rps: f64,
    /// Requests completed (all of them succeeded).
    pub requests: u64,
}

/// `h2load` (prior-knowledge h2c): requests per second over `secs`, `conns` connections with
/// `streams` concurrent streams each; `post` sends that file as a POST body with gRPC's
/// headers. Fails if any request did not succeed.
pub fn h2load(
    ns: &Netns,
    url: &str,
    conns: u32,
    streams: u32,
    secs: f64,
    post: Option<&std::path::Path>,
) -> anyhow::Result<H2load> {
    let mut c = ns.cmd("h2load");
    c.args([
        "-t",
        "2",
        "-c",
        &conns.to_string(),
        "-m",
        &streams.to_string(),
    ])
    .arg("-D")
    .arg(format!("{}", secs.max(1.0).round()));
    if let Some(body) = post {
        c.arg("-d")
            .arg(body)
            .args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
    }
    let out = c.arg(url).output().context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("h2load failed ({}): {text}", out.status);
    }
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .map(str::to_string)
            .with_context(|| format!("no `{prefix}` line in h2load's report:\n{text}"))
    };
    let requests = line("requests:")?;
    let count = |what: &str| {
        requests
            .split(',')
            .find_map(|p| {
                p.trim()
                    .trim_start_matches("requests:")
                    .trim()
                    .strip_suffix(what)
            })
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    let (done, ok) = (count("done"), count("succeeded"));
    let codes = line("status codes:")?;
    let done = match done {
        Some(d) if d > 0 && Some(d) == ok => d,
        _ => bail!("h2load: {requests}; {codes}"),
    };
    if !codes.contains(" 0 3xx, 0 4xx, 0 5xx") {
        bail!("h2load: {codes}");
    }
    let rps = line("finished in")?
        .split(',')
        .find_map(|p| p.trim().strip_suffix("req/s"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no req/s in h2load's report:\n{text}"))?;
    Ok(H2load {
        rps,
        requests: done,
    })
}

/// What one iperf3 run received.
#[derive(Debug, Clone, Copy)]
pub struct Iperf {
    pub gbits: f64,
    /// Gigabytes received over the run.
    pub gb: f64,
}

/// iperf3 from `client`, connecting to `connect` (the server's address, or a proxy's), to a
/// one-off server in `server` on `port`, for `secs` with `streams` parallel streams.
pub fn iperf3(
    client: &Netns,
    server: &Netns,
    connect: std::net::SocketAddr,
    port: u16,
    streams: u32,
    secs: f64,
) -> anyhow::Result<Iperf> {
    let mut srv = server
        .cmd("iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    // Waits for the server's listening socket (`ss`, not a probe connection: a one-off server
    // would take a probe for its client). A fixed 200 ms was sometimes too short under CI.
    let listening = || {
        server
            .cmd("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .is_ok_and(|o| !o.stdout.is_empty())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !listening() {
        if std::time::Instant::now() > deadline {
            let _ = srv.kill();
            let _ = srv.wait();
            bail!("iperf3 -s did not listen on port {port} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = client
        .cmd("iperf3")
        .args(["-c", &connect.ip().to_string()])
        .args(["-p", &connect.port().to_string(), "-J"])
        .args(["-P", &streams.to_string()])
        .arg("-t")
        .arg(format!("{}", secs.max(1.0).round()))
        .output()
        .context("running iperf3 -c")?;
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    let received = &v["end"]["sum_received"];
    match (
        received["bits_per_second"].as_f64(),
        received["bytes"].as_f64(),
    ) {
        (Some(bits), Some(bytes)) => Ok(Iperf {
            gbits: bits / 1e9,
            gb: bytes / 1e9,
        }),
        _ => bail!("no sum_received in iperf3's report: {v}"),
    }
}

/// One HTTP/1.1 request on `s`; the status and body. Understands Content-Length and chunked
/// bodies, which is all the backend and the proxies send.
fn exchange(
    s: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    s.write_all(request)?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before a response");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let body = &buf[head_end..];
        let complete = match length {
            Some(n) => body.len() >= n,
            None if chunked => body.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if complete {
            break;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            if length.is_none() && !chunked {
                break;
            }
            bail!("connection closed in the middle of a body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((status, buf[head_end..].to_vec()))
}

fn get_request(path: &str, close: bool) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// One GET from inside `ns`: status and body.
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let req = get_request(path, true);
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let (status, body) = exchange(&mut s, &req, &mut Vec::new())?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
}

/// Latencies of `count` requests, each on a new connection (connect, GET, whole response),
/// microseconds.
pub fn new_connections(ns: &Netns, addr: SocketAddr, count: usize) -> anyhow::Result<Vec<f64>> {
    let req = get_request("/", true);
    ns.run(move || {
        let mut v = Vec::with_capacity(count);
        let mut buf = Vec::new();
        for _ in 0..count {
            let start = Instant::now();
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let (status, _) = exchange(&mut s, &req, &mut buf)?;
            if status != 200 {
                bail!("status {status}");
            }
            v.push(start.elapsed().as_secs_f64() * 1e6);
        }
        Ok(v)
    })
}

/// What the constant-rate client measured.
pub struct Rated {
    /// Latency of each request from its scheduled send time, microseconds, sorted.
    pub latencies_us: Vec<f64>,
}

/// An open-loop client: `rate` GETs per second for `duration` over `conns` keep-alive
/// connections, each request sent at its slot in a fixed timetable (connection i sends at
/// start + i/rate + k*conns/rate). Latency counts from the scheduled send, so a response that
/// holds a connection up is charged to every request queued behind it (no coordinated omission).
/// Fails on any error or non-200 response.
pub fn constant_rate(
    ns: &Netns,
    addr: SocketAddr,
    rate: f64,
    conns: usize,
    duration: Duration,
) -> anyhow::Result<Rated> {
    let start = Instant::now() + Duration::from_millis(300);
    let end = start + duration;
    let period = Duration::from_secs_f64(conns as f64 / rate);
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            let offset = Duration::from_secs_f64(i as f64 / rate);
            ns.spawn(move || -> anyhow::Result<Vec<f64>> {
                let req = get_request("/", false);
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut buf = Vec::new();
                let mut lat = Vec::new();
                let mut due = start + offset;
                while due < end {
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let (status, _) = exchange(&mut s, &req, &mut buf)?;
                    if status != 200 {
                        bail!("status {status}");
                    }
                    lat.push(due.elapsed().as_secs_f64() * 1e6);
                    due += period;
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        let lat = w
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        all.extend(lat);
    }
    all.sort_by(f64::total_cmp);
    Ok(Rated { latencies_us: all })
}

/// The `q` quantile of sorted `v`.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 5s test @ http://10.96.0.80/\n  2 threads and 16 connections\n\
        \x20 Latency Distribution\n     50%  543.00us\n     75%  700.00us\n     90%    1.00ms\n     99%    1.20ms\n\
        \x20 123456 requests in 5.00s, 17.30MB read\n  Socket errors: connect 0, read 16, write 0, timeout 0\n\
        Requests/sec:  24691.20\nTransfer/sec:      3.46MB\n";

    #[test]
    fn reads_wrk_reports() {
        let w = parse_wrk(WRK).expect("parsed");
        assert_eq!(w.requests, 123_456);
        assert!((w.rps - 24_691.2).abs() < 1e-6);
        assert!((w.p99_us - 1200.0).abs() < 1e-6);
    }

    #[test]
    fn wrk_errors_fail_the_run() {
        let bad = WRK.replace(
            "Requests/sec",
            "  Non-2xx or 3xx responses: 12\nRequests/sec",
        );
        let e = parse_wrk(&bad).expect_err("non-2xx");
        assert!(
            e.to_string().contains("Non-2xx or 3xx responses: 12"),
            "{e}"
        );
        let bad = WRK.replace("timeout 0", "timeout 3");
        assert!(parse_wrk(&bad).is_err());
    }
}
