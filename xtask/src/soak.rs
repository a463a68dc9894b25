//! `cargo xtask soak --minutes N`: the agent under mixed load for N minutes, its memory and open
//! files sampled every second, and a verdict on whether they came back once the load stopped.
//!
//! Inside network namespaces of its own (the test harness's [`Topology`]: a node namespace for
//! the agent, a client and a server pod), the run goes:
//!
//! 1. warm-up: the load below for a sixth of the run (10-60 s), then the load stops and, once the
//!    open fds stop moving, the idle agent's VmRSS and fd count are the **baseline**;
//! 2. soak: N minutes of HTTP/1.1 keep-alive and one-request connections through a Service
//!    VIP and its HTTPRoute, long (5-15 s) and short L4 connections echoing every byte,
//!    a policy reload every 5 s (the route's header value changes) and a takeover (a new agent
//!    beside the old one, which hands over and exits) every quarter of the run ([`restart`]);
//! 3. settle: the load stops; within [`SETTLE`] the agent's fds must be back to the baseline
//!    and its RSS within [`RSS_TOLERANCE_PCT`] % (at least [`RSS_TOLERANCE_MIB`] MiB) of it.
//!
//! Every sample goes to `soak.csv` and the curves to `soak.png` in the folder it prints. The
//! backend closes keep-alive connections idle for a second, so the agent's upstream pool empties
//! once the load stops and an idle agent's fds are a fixed number.
pub mod chart;

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{Agent, Netns, Topology, policy::write_atomically, servers::greeter};

/// RSS after the load may exceed the baseline by this much (percent) ...
const RSS_TOLERANCE_PCT: u64 = 15;
/// ... or by this many MiB, whichever is larger: a debug agent's idle RSS is small enough that
/// allocator caches alone move it by a few MiB.
const RSS_TOLERANCE_MIB: u64 = 8;
/// How long after the load stops RSS and fds may take to come back.
const SETTLE: Duration = Duration::from_secs(20);
const RELOAD_EVERY: Duration = Duration::from_secs(5);
const HTTP_PORT: u16 = 8080;
const L4_PORT: u16 = 9000;
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 10);

/// Load counters, shared by the load threads and the sampler.
#[derive(Default)]
struct Counts {
    http_ok: AtomicU64,
    http_errors: AtomicU64,
    l4_rounds: AtomicU64,
    l4_errors: AtomicU64,
    /// Connections that went straight to the server (fail open while no agent listened).
    direct: AtomicU64,
    reloads: AtomicU64,
    restarts: AtomicU64,
}

/// One sample of the agent process.
struct Sample {
    t: f64,
    phase: &'static str,
    pid: u32,
    rss_kib: u64,
    fds: u64,
    http_ok: u64,
    http_errors: u64,
    l4_rounds: u64,
    l4_errors: u64,
    direct: u64,
    reloads: u64,
    restarts: u64,
}

pub fn run(minutes: f64, agent_bin: &Path) -> anyhow::Result<()> {
    if !is_root() {
        bail!("cargo xtask soak needs root (network namespaces, BPF)");
    }
    let soak = Duration::from_secs_f64(minutes * 60.0);
    let warmup = (soak / 6).clamp(Duration::from_secs(10), Duration::from_secs(60));
    let out_dir = crate::util::target_dir().join("soak");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let t = Topology::new(&["client", "server"]);
    let (client, server) = (t.pod("client").clone(), t.pod("server").clone());
    greeter(
        &server.ns,
        SocketAddr::new(server.ip4.into(), L4_PORT),
        "l4",
    );
    http_backend(&server.ns, SocketAddr::new(server.ip4.into(), HTTP_PORT));
    let policy_file = out_dir.join("policy.yaml");
    write_atomically(&policy_file, &policy(server.ip4.into(), 0));
    let args: Vec<String> = [
        "--interface",
        &client.host_if,
        "--policy",
        &policy_file.to_string_lossy(),
        "--capture",
        &format!("10.201.2.0/24={L4_PORT}"),
        "--fail-mode",
        "open",
        // A restart waits this long for open connections (SIGTERM drains them).
        "--drain-timeout",
        "2s",
    ]
    .map(String::from)
    .to_vec();
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = t.start_agent_bin(agent_bin, &arg_refs);

    let counts = Arc::new(Counts::default());
    let pid = Arc::new(AtomicU32::new(agent.pid()));
    let phase = Arc::new(Mutex::new("warm-up"));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampling = Arc::new(AtomicBool::new(true));
    let start = Instant::now();
    let sampler = {
        let (counts, pid, phase, samples, sampling) = (
            counts.clone(),
            pid.clone(),
            phase.clone(),
            samples.clone(),
            sampling.clone(),
        );
        thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                let p = pid.load(Ordering::Relaxed);
                if let Some((rss_kib, fds)) = process_figures(p) {
                    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
                    samples.lock().expect("samples").push(Sample {
                        t: start.elapsed().as_secs_f64(),
                        phase: *phase.lock().expect("phase"),
                        pid: p,
                        rss_kib,
                        fds,
                        http_ok: c(&counts.http_ok),
                        http_errors: c(&counts.http_errors),
                        l4_rounds: c(&counts.l4_rounds),
                        l4_errors: c(&counts.l4_errors),
                        direct: c(&counts.direct),
                        reloads: c(&counts.reloads),
                        restarts: c(&counts.restarts),
                    });
                }
                thread::sleep(Duration::from_secs(1));
            }
        })
    };

    println!(
        "== soak: warm-up {warmup:?}, then {minutes} min of load, agent {}",
        agent_bin.display()
    );
    let load = Load::start(&client.ns, client.ip4, server.ip4, &counts);
    thread::sleep(warmup);
    load.stop();
    let mut marks = vec![
        (0.0, chart::GREY),
        (start.elapsed().as_secs_f64(), chart::GREY),
    ];
    *phase.lock().expect("phase") = "baseline";
    let baseline = settle_figures(agent.pid(), Duration::from_secs(15));
    println!(
        "baseline (idle, after warm-up): RSS {:.1} MiB, {} open fds",
        mib(baseline.0),
        baseline.1
    );

    *phase.lock().expect("phase") = "soak";
    marks.push((start.elapsed().as_secs_f64(), chart::GREY));
    let load = Load::start(&client.ns, client.ip4, server.ip4, &counts);
    let soak_start = Instant::now();
    let restart_every = (soak / 4).max(Duration::from_secs(15));
    let mut next_restart = restart_every;
    let mut generation = 0;
    let mut next_reload = RELOAD_EVERY;
    while soak_start.elapsed() < soak {
        let now = soak_start.elapsed();
        if now >= next_reload {
            generation += 1;
            write_atomically(&policy_file, &policy(server.ip4.into(), generation));
            counts.reloads.fetch_add(1, Ordering::Relaxed);
            next_reload += RELOAD_EVERY;
        }
        // No restart in the last 10 s: the agent measured at the end has carried load.
        if now >= next_restart && soak - now > Duration::from_secs(10) {
            marks.push((start.elapsed().as_secs_f64(), chart::RED));
            agent = restart(&t, agent_bin, &arg_refs, agent)?;
            pid.store(agent.pid(), Ordering::Relaxed);
            counts.restarts.fetch_add(1, Ordering::Relaxed);
            next_restart += restart_every;
        }
        thread::sleep(Duration::from_millis(100));
    }
    load.stop();
    marks.push((start.elapsed().as_secs_f64(), chart::GREY));
    *phase.lock().expect("phase") = "settle";
    let verdict = settle(&agent, baseline);
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let samples = std::mem::take(&mut *samples.lock().expect("samples"));

    let csv = out_dir.join("soak.csv");
    write_csv(&csv, &samples)?;
    let png = out_dir.join("soak.png");
    draw(&samples, &marks, baseline).save_png(&png)?;
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let peak = samples
        .iter()
        .map(|s| (s.rss_kib, s.fds))
        .fold((0, 0), |a, b| (a.0.max(b.0), a.1.max(b.1)));
    println!(
        "load: {} HTTP requests ({} failed), {} L4 echo rounds ({} connections failed), {} connections \
         direct while no agent listened, {} policy reloads, {} takeovers",
        c(&counts.http_ok),
        c(&counts.http_errors),
        c(&counts.l4_rounds),
        c(&counts.l4_errors),
        c(&counts.direct),
        c(&counts.reloads),
        c(&counts.restarts)
    );
    println!(
        "agent: baseline RSS {:.1} MiB / {} fds, peak {:.1} MiB / {} fds, after the load {:.1} MiB / {} fds \
         (tolerance: RSS +{RSS_TOLERANCE_PCT} % or +{RSS_TOLERANCE_MIB} MiB, fds back to the baseline, within {SETTLE:?})",
        mib(baseline.0),
        baseline.1,
        mib(peak.0),
        peak.1,
        mib(verdict.figures.0),
        verdict.figures.1,
    );
    println!("samples: {}\nchart:   {}", csv.display(), png.display());
    if let Some(why) = verdict.failure {
        bail!("soak failed: {why}");
    }
    // Takeovers and reloads drop nothing: any failed request or connection is a failure.
    if c(&counts.http_errors) > 0 || c(&counts.l4_errors) > 0 || c(&counts.direct) > 0 {
        bail!(
            "soak failed: {} HTTP requests and {} L4 connections failed, {} connections went \
             direct (takeovers and reloads must drop nothing)",
            c(&counts.http_errors),
            c(&counts.l4_errors),
            c(&counts.direct)
        );
    }
    if c(&counts.http_ok) == 0 || c(&counts.l4_rounds) == 0 {
        bail!("soak failed: no load went through the agent");
    }
    Ok(())
}

/// Replaces the running agent with a new one started with the same arguments, as an upgrade
/// does: the new agent starts while the old one runs, takes over its listeners, programs and
/// connections (see `mesh-agent/src/handover.rs`), and the old one exits by itself.
fn restart(t: &Topology, bin: &Path, args: &[&str], mut old: Agent) -> anyhow::Result<Agent> {
    let mut new = t.spawn_agent_bin(bin, args);
    new.wait_ready();
    let status = old.wait_exit(Duration::from_secs(30));
    if !status.success() {
        bail!(
            "the old agent exited with {status} after the takeover:\n{}",
            old.log()
        );
    }
    Ok(new)
}

/// Outcome of the settle period: the last figures, and why they fail the run, if they do.
struct Verdict {
    figures: (u64, u64),
    failure: Option<String>,
}

fn rss_limit_kib(baseline_kib: u64) -> u64 {
    baseline_kib + (baseline_kib * RSS_TOLERANCE_PCT / 100).max(RSS_TOLERANCE_MIB * 1024)
}

/// Waits up to [`SETTLE`] for fds back at the baseline and RSS within the tolerance.
fn settle(agent: &Agent, (base_rss, base_fds): (u64, u64)) -> Verdict {
    let deadline = Instant::now() + SETTLE;
    let limit = rss_limit_kib(base_rss);
    loop {
        let figures = process_figures(agent.pid()).unwrap_or((u64::MAX, u64::MAX));
        let (rss, fds) = figures;
        if rss <= limit && fds <= base_fds {
            return Verdict {
                figures,
                failure: None,
            };
        }
        if Instant::now() >= deadline {
            let mut why = String::new();
            if rss > limit {
                let _ = write!(
                    why,
                    "RSS {:.1} MiB is above the limit {:.1} MiB (baseline {:.1} MiB); ",
                    mib(rss),
                    mib(limit),
                    mib(base_rss)
                );
            }
            if fds > base_fds {
                let _ = write!(why, "{fds} open fds, baseline {base_fds}; ");
            }
            return Verdict {
                figures,
                failure: Some(format!("{}{SETTLE:?} after the load stopped", why)),
            };
        }
        thread::sleep(Duration::from_secs(1));
    }
}

/// The idle figures once the fd count has held still for 3 s (at most `within`).
fn settle_figures(pid: u32, within: Duration) -> (u64, u64) {
    let deadline = Instant::now() + within;
    let mut last = None;
    let mut still = 0;
    loop {
        let now = process_figures(pid).unwrap_or_default();
        if last.map(|(_, f)| f) == Some(now.1) {
            still += 1;
        } else {
            still = 0;
        }
        last = Some(now);
        if still >= 3 || Instant::now() >= deadline {
            return now;
        }
        thread::sleep(Duration::from_secs(1));
    }
}

/// VmRSS (KiB) and the number of open fds of `pid`.
fn process_figures(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

fn is_root() -> bool {
    // /proc/self/status's Uid line: real, effective, saved, filesystem.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A Service on the VIP with one endpoint and an HTTPRoute whose request header carries
/// `generation`: each reload is a real change the agent compiles and swaps in.
fn policy(endpoint: IpAddr, generation: u64) -> String {
    mesh_tests::policy::service("web", VIP.into(), 80, HTTP_PORT, &[endpoint])
        + &format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: web, namespace: mesh-test}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n\
             \x20 - filters:\n\
             \x20   - type: RequestHeaderModifier\n\
             \x20     requestHeaderModifier: {{set: [{{name: x-soak-generation, value: \"{generation}\"}}]}}\n\
             \x20   backendRefs: [{{name: web, port: 80}}]\n"
        )
}

/// An HTTP/1.1 backend that answers every request with the peer it saw and closes a
/// keep-alive connection idle for a second.
fn http_backend(ns: &Netns, addr: SocketAddr) {
    let listener = ns.run(move || TcpListener::bind(addr).expect("bind the HTTP backend"));
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let peer = conn
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
                let Ok(mut w) = conn.try_clone() else { return };
                let mut r = BufReader::new(conn);
                loop {
                    let mut line = String::new();
                    let mut head_done = false;
                    while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                        if line.ends_with("\r\n\r\n") {
                            head_done = true;
                            break;
                        }
                    }
                    if !head_done {
                        return;
                    }
                    let body = format!("{{\"peer\":\"{peer}\"}}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// The load threads; [`Load::stop`] ends them and waits for them.
struct Load {
    on: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// Load from `ns` (the client pod, address `client`) to the server pod at `server`.
    fn start(ns: &Netns, client: Ipv4Addr, server: Ipv4Addr, counts: &Arc<Counts>) -> Load {
        let on = Arc::new(AtomicBool::new(true));
        let mut threads = Vec::new();
        let vip = SocketAddr::new(VIP.into(), 80);
        let l4 = SocketAddr::new(server.into(), L4_PORT);
        // The greeter names its peer: the node (the agent) or, while no agent listens, the client.
        let direct = Arc::new(format!("peer={client} "));
        // HTTP keep-alive connections, 200 requests each, then a new one.
        for _ in 0..4 {
            let (on, counts) = (on.clone(), counts.clone());
            threads.push(ns.spawn(move || {
                while on.load(Ordering::Relaxed) {
                    http_connection(vip, 200, &on, &counts);
                }
            }));
        }
        // One request per connection.
        for _ in 0..2 {
            let (on, counts) = (on.clone(), counts.clone());
            threads.push(ns.spawn(move || {
                while on.load(Ordering::Relaxed) {
                    http_connection(vip, 1, &on, &counts);
                    thread::sleep(Duration::from_millis(10));
                }
            }));
        }
        // Long L4 connections (5-15 s, a round every 50 ms) and short ones (one round).
        for i in 0..20u64 {
            let (on, counts, direct) = (on.clone(), counts.clone(), direct.clone());
            threads.push(ns.spawn(move || {
                let mut n = i;
                while on.load(Ordering::Relaxed) {
                    n += 7;
                    let life = Duration::from_millis(5_000 + (n * 1_327) % 10_000);
                    l4_connection(l4, life, &direct, &on, &counts);
                }
            }));
        }
        for _ in 0..2 {
            let (on, counts, direct) = (on.clone(), counts.clone(), direct.clone());
            threads.push(ns.spawn(move || {
                while on.load(Ordering::Relaxed) {
                    l4_connection(l4, Duration::ZERO, &direct, &on, &counts);
                    thread::sleep(Duration::from_millis(10));
                }
            }));
        }
        Load { on, threads }
    }

    fn stop(self) {
        self.on.store(false, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Up to `requests` GETs on one connection to the VIP (every 20 ms), counting each.
fn http_connection(vip: SocketAddr, requests: u32, on: &AtomicBool, counts: &Counts) {
    let fail = || {
        counts.http_errors.fetch_add(1, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(100));
    };
    let Ok(s) = TcpStream::connect_timeout(&vip, Duration::from_secs(2)) else {
        return fail();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(mut w) = s.try_clone() else {
        return fail();
    };
    let mut r = BufReader::new(s);
    for i in 0..requests {
        if !on.load(Ordering::Relaxed) {
            return;
        }
        let close = if i + 1 == requests {
            "close"
        } else {
            "keep-alive"
        };
        let req = format!("GET /soak/{i} HTTP/1.1\r\nHost: web\r\nConnection: {close}\r\n\r\n");
        if w.write_all(req.as_bytes()).is_err() {
            return fail();
        }
        match response_status(&mut r) {
            Some(200) => {
                counts.http_ok.fetch_add(1, Ordering::Relaxed);
            }
            _ => return fail(),
        }
        if requests > 1 {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reads one response (status line, headers, `Content-Length` body); its status.
fn response_status(r: &mut impl BufRead) -> Option<u16> {
    let mut status = None;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if status.is_none() {
            status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
        } else if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).ok()?;
    status
}

/// One L4 connection: the greeting, then a line echoed every 50 ms for `life` (at least one
/// round), every byte checked; then a clean close. A greeting starting `direct` was not proxied.
fn l4_connection(addr: SocketAddr, life: Duration, direct: &str, on: &AtomicBool, counts: &Counts) {
    let fail = || {
        counts.l4_errors.fetch_add(1, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(100));
    };
    let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return fail();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(mut w) = s.try_clone() else {
        return fail();
    };
    let mut r = BufReader::new(s);
    let mut greeting = String::new();
    if r.read_line(&mut greeting).is_err() || greeting.is_empty() {
        return fail();
    }
    if greeting.starts_with(direct) {
        counts.direct.fetch_add(1, Ordering::Relaxed);
    }
    let end = Instant::now() + life;
    let mut round = 0u64;
    loop {
        let msg = format!("round {round}\n");
        if w.write_all(msg.as_bytes()).is_err() {
            return fail();
        }
        let mut back = vec![0u8; msg.len()];
        if r.read_exact(&mut back).is_err() || back != msg.as_bytes() {
            return fail();
        }
        counts.l4_rounds.fetch_add(1, Ordering::Relaxed);
        round += 1;
        if Instant::now() >= end || !on.load(Ordering::Relaxed) {
            let _ = w.shutdown(std::net::Shutdown::Write);
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn write_csv(path: &PathBuf, samples: &[Sample]) -> anyhow::Result<()> {
    let mut out = String::from(
        "t_s,phase,pid,rss_kib,fds,http_ok,http_errors,l4_rounds,l4_errors,direct,reloads,restarts\n",
    );
    for s in samples {
        let _ = writeln!(
            out,
            "{:.1},{},{},{},{},{},{},{},{},{},{},{}",
            s.t,
            s.phase,
            s.pid,
            s.rss_kib,
            s.fds,
            s.http_ok,
            s.http_errors,
            s.l4_rounds,
            s.l4_errors,
            s.direct,
            s.reloads,
            s.restarts
        );
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

fn draw(samples: &[Sample], marks: &[(f64, chart::Rgb)], baseline: (u64, u64)) -> chart::Canvas {
    let rss: Vec<(f64, f64)> = samples.iter().map(|s| (s.t, mib(s.rss_kib))).collect();
    let fds: Vec<(f64, f64)> = samples.iter().map(|s| (s.t, s.fds as f64)).collect();
    let limit = mib(rss_limit_kib(baseline.0));
    chart::draw(
        &[
            chart::Panel {
                title: "AGENT RSS (MIB)",
                points: &rss,
                color: chart::BLUE,
                levels: vec![
                    (
                        mib(baseline.0),
                        chart::GREEN,
                        format!("BASELINE {:.1}", mib(baseline.0)),
                    ),
                    (limit, chart::RED, format!("LIMIT {limit:.1}")),
                ],
            },
            chart::Panel {
                title: "AGENT OPEN FDS",
                points: &fds,
                color: chart::ORANGE,
                levels: vec![(
                    baseline.1 as f64,
                    chart::GREEN,
                    format!("BASELINE {}", baseline.1),
                )],
            },
        ],
        marks,
        &[
            (chart::GREY, "LOAD ON/OFF"),
            (chart::RED, "TAKEOVER"),
            (chart::GREEN, "IDLE BASELINE"),
        ],
    )
}
