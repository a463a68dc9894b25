//! `cargo xtask kernels`: the privileged integration tests on the kernels the README promises,
//! not only on the host's.
//!
//! Debian's kernel packages (the 6.1 and 6.12 lines, newest by `apt-cache`) are fetched with
//! `apt-get download` into `~/.cache/mesh-kernels` and unpacked there; nothing goes into the
//! host's `/boot` or `/lib/modules`. Each boots under qemu with TCG (KVM exists here but hangs
//! nested) from a small initramfs: busybox-static, the kernel's own virtio/9p modules and
//! `guest/init`, which mounts the host's root read-only over 9p and runs the test executables
//! built on the host (each test alone, two at a time), with the agent built on the host. The VM has
//! no network device: the tests build their own namespaces and veths inside it. The `host` row runs
//! the same script on the host, without a VM.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::util::{build_agent, cargo, clean_leftovers, entries_under, output, root};

/// Which kernels to run on.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Target {
    /// The host's kernel, no VM.
    Host,
    /// Debian's 6.1 line (bookworm's own kernel) in a VM.
    #[value(name = "6.1")]
    V6_1,
    /// Debian's 6.12 line (the `+deb12` packages) in a VM.
    #[value(name = "6.12")]
    V6_12,
    /// Debian bullseye's 5.10 line in a VM: older than the agent supports (no
    /// `bpf_xdp_load_bytes`), for the test that it refuses such a kernel in one line.
    #[value(name = "5.10")]
    V5_10,
    /// The host, then 6.1 and 6.12.
    All,
}

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Kernel(s) to test.
    #[arg(long, value_enum, default_value = "all")]
    pub kernel: Target,
    /// Only tests whose `suite::name` contains this text.
    #[arg(long)]
    pub tests: Option<String>,
    /// Test files of the `tests` crate to run (comma-separated); `file::text` takes only the
    /// tests of that file whose name contains `text`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kernel,capture,xdp,authz,http,mtls::strict_"
    )]
    pub suites: Vec<String>,
    /// Also run, in VMs, the tests left out there as too slow or timer-bound under TCG.
    #[arg(long)]
    pub heavy: bool,
    /// Give up on one kernel's run after this many seconds.
    #[arg(long, default_value_t = 1500)]
    pub timeout: u64,
    /// Tests run side by side (each VM has 2 vCPUs).
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Memory of each VM, in MiB.
    #[arg(long, default_value_t = 3072)]
    pub memory: u32,
}

impl Options {
    /// What `cargo xtask test` runs: the 6.1 line, default suites, within CI's budget.
    pub fn ci() -> Self {
        Options {
            kernel: Target::V6_1,
            tests: None,
            suites: DEFAULT_SUITES.iter().map(|s| s.to_string()).collect(),
            heavy: false,
            timeout: 900,
            jobs: 2,
            memory: 3072,
        }
    }
}

/// Suites run in the VM by default; `suite::text` takes only the suite's tests whose name
/// contains `text` (the STRICT test is the one mTLS test whose kernel side differs before 6.6:
/// a clsact egress filter instead of a TCX link).
const DEFAULT_SUITES: &[&str] = &["kernel", "capture", "xdp", "authz", "http", "mtls::strict_"];

impl Options {
    /// The second step of `cargo xtask test`: the agent refuses Debian's 5.10 in one line.
    pub fn ci_refusal() -> Self {
        Options {
            kernel: Target::V5_10,
            suites: vec!["kernel".into()],
            timeout: 300,
            ..Self::ci()
        }
    }
}

/// Tests left out in VMs unless `--heavy`, and why. Under TCG the CPU is emulated (10-30x slower
/// than the host): load tests measure the emulator rather than the kernel and would take most of
/// CI's budget, and a test bound to a short timer fails for the emulator's sake.
const HEAVY: &[(&str, &str)] = &[
    (
        "capture::sixty_four_mib_each_way_arrive_intact",
        "128 MiB through the proxy and SHA-256 on an emulated CPU",
    ),
    (
        "capture::five_hundred_concurrent_connections_complete",
        "500 connections through the agent on an emulated CPU",
    ),
    (
        "http::weighted_split_retries_timeouts_and_ejection",
        "2,000 requests (2.5 min under TCG), then a 2 s bound on a 504 (seen on 6.12: 2.005 s)",
    ),
    (
        "http::reload_under_h2load_fails_no_request",
        "h2load for 6 s while the policy changes 3 times 1.5 s apart: under TCG a reload can \
         outlast 1.5 s and two edits coalesce (seen once on 6.12: no `policy rejected`)",
    ),
    (
        "http::grpc_is_routed_by_method_with_status_and_trailers_intact",
        "the Python gRPC client's first bytes come after the agent's 100 ms protocol-detection \
         timeout on an emulated CPU, so the call goes through as opaque TCP (seen on 6.12: no \
         x-request-id, Count served by g1)",
    ),
];

/// Longest one test may run inside a VM before `timeout` kills it.
const TEST_TIMEOUT_SECS: u64 = 300;

/// A Debian kernel line: the `apt-cache search` pattern of its packages. The generic flavour, not
/// `cloud`: the cloud kernels are built without 9p (`CONFIG_NET_9P` unset).
struct Line {
    name: &'static str,
    package: &'static str,
    /// A Debian suite other than the machine's own (bookworm) to find the package in, through a
    /// private apt configuration in the cache: the machine's sources are never changed.
    suite: Option<&'static str>,
}

const LINES: &[Line] = &[
    Line {
        name: "6.1",
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        suite: None,
    },
    Line {
        name: "6.12",
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
        suite: None,
    },
    Line {
        name: "5.10",
        package: r"^linux-image-5\.10\.0-[0-9]+-amd64-unsigned$",
        suite: Some("bullseye"),
    },
];

/// Modules the initramfs loads itself, before the host root is there (with their dependencies).
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// Modules loaded from the host root once mounted: what the tests and the agent use (veths, the
/// clsact qdisc and TC BPF classifier for a netlink attach, nftables NAT for the kube-proxy DNAT).
/// Anything else the kernel asks for is loaded on demand the same way.
const PRELOAD: &[&str] = &[
    "veth",
    "sch_ingress",
    "cls_bpf",
    "act_bpf",
    "nf_tables",
    "nft_chain_nat",
    "nft_nat",
    "nft_ct",
    "nft_reject_inet",
];

/// One test executable's test.
#[derive(Clone)]
struct Test {
    /// `suite::name`, as printed in the table.
    label: String,
    exe: PathBuf,
    name: String,
}

#[derive(Clone, PartialEq)]
enum Status {
    Pass,
    Fail(i32),
    Timeout,
    NotRun,
    Skipped,
}

impl Status {
    fn cell(&self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail(_) => "FAIL",
            Status::Timeout => "TIMEOUT",
            Status::NotRun => "NOT RUN",
            Status::Skipped => "skip",
        }
    }
}

/// What one kernel's run produced.
struct Row {
    /// Column heading: `host 6.18.44` or the Debian kernel release.
    title: String,
    results: BTreeMap<String, (Status, Duration, Option<String>)>,
    probes: BTreeMap<String, String>,
    boot: Option<Duration>,
    total: Duration,
    log: PathBuf,
    /// Why the run ended early, if it did.
    aborted: Option<String>,
}

impl Row {
    fn failed(&self) -> Vec<&str> {
        self.results
            .iter()
            .filter(|(_, (s, _, _))| !matches!(s, Status::Pass | Status::Skipped))
            .map(|(l, _)| l.as_str())
            .collect()
    }
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let targets: Vec<Target> = match opts.kernel {
        Target::All => vec![Target::Host, Target::V6_1, Target::V6_12],
        t => vec![t],
    };
    let agent = build_agent(false)?;
    let tests = select(test_executables()?, opts)?;
    if tests.is_empty() {
        bail!(
            "no test matches suites {:?} and {:?}",
            opts.suites,
            opts.tests
        );
    }
    let cache = cache_dir();
    let logs = cache.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut rows = Vec::new();
    for t in targets {
        let row = match t {
            Target::Host => run_host(&tests, &agent, opts, &logs)?,
            Target::V6_1 | Target::V6_12 | Target::V5_10 => {
                let name = match t {
                    Target::V6_1 => "6.1",
                    Target::V6_12 => "6.12",
                    _ => "5.10",
                };
                let line = LINES
                    .iter()
                    .find(|l| l.name == name)
                    .context("kernel line")?;
                let kernel = fetch(line, &cache)?;
                run_vm(&kernel, &tests, &agent, opts, &logs)?
            }
            Target::All => unreachable!("expanded above"),
        };
        rows.push(row);
    }
    print!("{}", report(&tests, &rows, opts));
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.failed().is_empty() || r.aborted.is_some())
        .map(|r| format!("{} ({} failed)", r.title, r.failed().len()))
        .collect();
    if !failed.is_empty() {
        bail!("kernels: failures on {}", failed.join(", "));
    }
    Ok(())
}

/// `~/.cache/mesh-kernels`: kernel packages, their unpacked trees, initramfs images and logs.
fn cache_dir() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cache/mesh-kernels")
}

/// The integration test executables of `mesh-tests`, by suite (test file) name. Built as
/// `cargo test --workspace` builds them: with `-p mesh-tests` alone, features unify differently
/// and `cargo xtask test` would build every test dependency a second time.
fn test_executables() -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let out = cargo()
        .args(["test", "--workspace", "--no-run", "--message-format=json"])
        .current_dir(root())
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the test executables failed");
    }
    let mut exes = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        let ours = v["package_id"]
            .as_str()
            .is_some_and(|p| p.contains("#mesh-tests@"));
        if v["reason"] == "compiler-artifact"
            && ours
            && is_test
            && let (Some(name), Some(exe)) =
                (v["target"]["name"].as_str(), v["executable"].as_str())
        {
            exes.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    Ok(exes)
}

/// The tests of the chosen suites matching `--tests`, in file order.
fn select(exes: BTreeMap<String, PathBuf>, opts: &Options) -> anyhow::Result<Vec<Test>> {
    let mut tests = Vec::new();
    for suite in &opts.suites {
        let (suite, only) = match suite.split_once("::") {
            Some((suite, only)) => (suite, Some(only)),
            None => (suite.as_str(), None),
        };
        let exe = exes.get(suite).with_context(|| {
            format!(
                "no test suite {suite:?} in mesh-tests (have {:?})",
                exes.keys().collect::<Vec<_>>()
            )
        })?;
        let list = |extra: &[&str]| -> anyhow::Result<Vec<String>> {
            let out = Command::new(exe)
                .args(["--list", "--format", "terse"])
                .args(extra)
                .output()
                .with_context(|| format!("listing {}", exe.display()))?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.strip_suffix(": test"))
                .map(str::to_string)
                .collect())
        };
        // `#[ignore]`d tests (benchmarks) are listed too, but `--exact` would not run them.
        let ignored = list(&["--ignored"])?;
        let chosen = |n: &&String| !ignored.contains(n) && only.is_none_or(|o| n.contains(o));
        for name in list(&[])?.iter().filter(chosen) {
            let label = format!("{suite}::{name}");
            if opts
                .tests
                .as_ref()
                .is_none_or(|p| label.contains(p.as_str()))
            {
                tests.push(Test {
                    label,
                    exe: exe.clone(),
                    name: name.to_string(),
                });
            }
        }
    }
    Ok(tests)
}

fn heavy(label: &str) -> Option<&'static str> {
    HEAVY.iter().find(|(l, _)| *l == label).map(|(_, why)| *why)
}

/// The script run on each kernel (by the VM's init, chrooted into the host root, or on the host):
/// probes first, then each test alone with a timeout, in `jobs` lanes that run side by side. A
/// test's output is printed whole when it ends, between marker lines the runner parses.
fn job(tests: &[&Test], agent: &Path, jobs: usize) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
# Generated by `cargo xtask kernels` (xtask/src/kernels.rs).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 RUST_BACKTRACE=0 MESH_REQUIRE_PRIVILEGED=1 MESH_AGENT_READY_SECS=90
"#,
    );
    let _ = writeln!(s, "export MESH_AGENT_BIN='{}'", agent.display());
    let _ = writeln!(s, "cd '{}'", root().display());
    s.push_str(
        r#"d=$(mktemp -d /tmp/mesh-kernels.XXXXXX)
trap 'rm -rf "$d"' EXIT
probe() { if "$@" >/dev/null 2>&1; then echo yes; else echo no; fi; }
echo "mesh-probe kernel $(uname -r)"
echo "mesh-probe btf $(probe test -r /sys/kernel/btf/vmlinux)"
f=$d/features
if bpftool feature probe kernel >$f 2>/dev/null; then
    for t in sched_cls xdp; do
        echo "mesh-probe prog-$t $(probe grep -q "program_type $t is available" $f)"
    done
    for m in lpm_trie sockmap percpu_array; do
        echo "mesh-probe map-$m $(probe grep -q "map_type $m is available" $f)"
    done
    awk '/helpers supported for program type sched_cls:/ {s = 1; next} /helpers supported/ {s = 0} s' $f >$f.cls
    for h in bpf_sk_assign bpf_skc_lookup_tcp bpf_redirect; do
        echo "mesh-probe helper-$h $(probe grep -qw $h $f.cls)"
    done
else
    echo "mesh-probe bpftool no"
fi
# run INDEX LABEL EXE NAME
run() {
    out=$d/$1.out
    start=$(date +%s%N)
"#,
    );
    let _ = writeln!(
        s,
        "    timeout -k 5 {TEST_TIMEOUT_SECS} \"$3\" --exact \"$4\" --test-threads=1 --color never >\"$out\" 2>&1"
    );
    s.push_str(
        r#"    rc=$?
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    flock "$d/lock" sh -c 'echo "mesh-test-begin $1"; cat "$2"; echo; echo "mesh-test-end $1 $3 $4"' \
        _ "$2" "$out" "$rc" "$ms"
}
"#,
    );
    // Read the agent (a debug build is ~190 MB) and the test executables once before any test
    // starts: over a cold 9p mount, the first agents took longer than the harness's 20 s to get
    // ready.
    s.push_str("cat \"$MESH_AGENT_BIN\"");
    let mut exes: Vec<&Path> = tests.iter().map(|t| t.exe.as_path()).collect();
    exes.dedup();
    for exe in exes {
        let _ = write!(s, " '{}'", exe.display());
    }
    s.push_str(" >/dev/null\n");
    // No empty lanes: `( )` is a shell syntax error.
    let jobs = jobs.clamp(1, tests.len().max(1));
    for lane in 0..jobs {
        s.push_str("(\n");
        for (i, t) in tests.iter().enumerate().skip(lane).step_by(jobs) {
            let _ = writeln!(
                s,
                "    run {i} '{}' '{}' '{}'",
                t.label,
                t.exe.display(),
                t.name
            );
        }
        s.push_str(") &\n");
    }
    s.push_str("wait\n");
    s
}

/// Runs the job on the host (no VM): the host kernel's row.
fn run_host(tests: &[Test], agent: &Path, opts: &Options, logs: &Path) -> anyhow::Result<Row> {
    let title = format!(
        "host {}",
        output("uname", &["-r"]).unwrap_or_default().trim()
    );
    eprintln!("kernels: {title}: {} tests, no VM", tests.len());
    let all: Vec<&Test> = tests.iter().collect();
    let script = cache_dir().join("host-job.sh");
    std::fs::write(&script, job(&all, agent, opts.jobs))?;
    clean_leftovers();
    let child = Command::new("sh")
        .arg(&script)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running the job on the host")?;
    let row = console(
        Proc { child, group: true },
        title,
        tests,
        &[],
        Duration::from_secs(opts.timeout),
        &logs.join("host.log"),
    );
    clean_leftovers();
    row
}

/// An unpacked Debian kernel package.
struct Kernel {
    /// The kernel release (`uname -r`), e.g. `6.1.0-57-amd64`.
    release: String,
    /// Root of the unpacked package: `boot/vmlinuz-*`, `lib/modules/<release>`.
    tree: PathBuf,
}

/// The newest package of `line` that apt knows, downloaded and unpacked once into the cache.
fn fetch(line: &Line, cache: &Path) -> anyhow::Result<Kernel> {
    let apt = apt_options(line, cache)?;
    let package = match newest_package(line.package, &apt) {
        Some(p) => p,
        None => {
            eprintln!(
                "kernels: no {} package known to apt; apt-get update",
                line.name
            );
            let _ = Command::new("apt-get")
                .args(&apt)
                .args(["update", "-qq"])
                .status();
            newest_package(line.package, &apt)
                .with_context(|| format!("no package matches {}", line.package))?
        }
    };
    let tree = cache.join(&package);
    let ready = tree.join(".ready");
    if !ready.exists() {
        let debs = cache.join("debs");
        std::fs::create_dir_all(&debs)?;
        let find_deb = || {
            std::fs::read_dir(&debs).ok().and_then(|d| {
                d.flatten().map(|e| e.path()).find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
                })
            })
        };
        let deb = match find_deb() {
            Some(d) => d,
            None => {
                eprintln!("kernels: apt-get download {package}");
                run_in(
                    Command::new("apt-get")
                        .args(&apt)
                        .args(["download", &package]),
                    &debs,
                )?;
                find_deb().with_context(|| format!("apt-get download {package} left no .deb"))?
            }
        };
        let _ = std::fs::remove_dir_all(&tree);
        run_in(
            Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree),
            cache,
        )?;
        let release = release_of(&tree)?;
        // The package leaves modules.dep to its postinst; modprobe needs it.
        run_in(
            Command::new("depmod").arg("-b").arg(&tree).arg(&release),
            cache,
        )?;
        std::fs::write(&ready, "")?;
    }
    let release = release_of(&tree)?;
    Ok(Kernel { release, tree })
}

fn release_of(tree: &Path) -> anyhow::Result<String> {
    std::fs::read_dir(tree.join("lib/modules"))
        .with_context(|| format!("{} has no lib/modules", tree.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .next()
        .with_context(|| format!("{} has no module tree", tree.display()))
}

/// `-o` options that point apt at `line`'s own suite (lists and cache under `cache`), or none
/// for the machine's own suites.
fn apt_options(line: &Line, cache: &Path) -> anyhow::Result<Vec<String>> {
    let Some(suite) = line.suite else {
        return Ok(Vec::new());
    };
    let dir = cache.join(format!("apt-{suite}"));
    std::fs::create_dir_all(dir.join("lists/partial"))?;
    std::fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let sources = dir.join("sources.list");
    std::fs::write(
        &sources,
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {suite} main\n"
        ),
    )?;
    Ok(vec![
        "-o".into(),
        format!("Dir::Etc::sourcelist={}", sources.display()),
        "-o".into(),
        "Dir::Etc::sourceparts=/dev/null".into(),
        "-o".into(),
        format!("Dir::State::lists={}", dir.join("lists").display()),
        "-o".into(),
        format!("Dir::Cache={}", dir.join("cache").display()),
    ])
}

/// The highest-versioned package name matching `pattern` in apt's lists.
fn newest_package(pattern: &str, apt: &[String]) -> Option<String> {
    let mut args: Vec<&str> = apt.iter().map(String::as_str).collect();
    args.extend(["search", "--names-only", pattern]);
    let list = output("apt-cache", &args)?;
    let version = |name: &str| -> Vec<u64> {
        name.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|n| version(n))
        .map(str::to_string)
}

fn run_in(cmd: &mut Command, dir: &Path) -> anyhow::Result<()> {
    let status = cmd
        .current_dir(dir)
        .status()
        .with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The initramfs: busybox, `guest/init`, the boot modules (decompressed, in load order), the
/// job, where the kernel's module tree is on the host, and the host paths under the guest's
/// scratch folders that must stay visible (`keep`).
fn initramfs(kernel: &Kernel, job: &str, keep: &[String]) -> anyhow::Result<Vec<u8>> {
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        cpio.dir(d);
    }
    cpio.node("dev/console", 0o020600, (5, 1));
    let busybox = std::fs::read("/bin/busybox")
        .context("/bin/busybox is missing (busybox-static; `cargo xtask setup` installs it)")?;
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, include_bytes!("../guest/init"));
    cpio.file("job.sh", 0o755, job.as_bytes());
    cpio.file("modroot", 0o644, kernel.tree.to_string_lossy().as_bytes());
    cpio.file("preload", 0o644, PRELOAD.join("\n").as_bytes());
    cpio.file("keep", 0o644, keep.join("\n").as_bytes());
    let mut order = Vec::new();
    for module in BOOT_MODULES {
        let deps = output(
            "modprobe",
            &[
                "-d",
                &kernel.tree.to_string_lossy(),
                "-S",
                &kernel.release,
                "--show-depends",
                module,
            ],
        )
        .with_context(|| format!("modprobe --show-depends {module} for {}", kernel.release))?;
        // `insmod /path/x.ko[.xz]` per module to load, in order; `builtin x` for built-in ones.
        for path in deps.lines().filter_map(|l| l.strip_prefix("insmod ")) {
            let path = Path::new(path.split_whitespace().next().unwrap_or_default());
            let file = path
                .file_name()
                .map(|n| n.to_string_lossy().trim_end_matches(".xz").to_string())
                .context("module path")?;
            if order.contains(&file) {
                continue;
            }
            let bytes = if path.extension().is_some_and(|e| e == "xz") {
                let out = Command::new("xz").arg("-dc").arg(path).output()?;
                if !out.status.success() {
                    bail!("xz -dc {} failed", path.display());
                }
                out.stdout
            } else {
                std::fs::read(path)?
            };
            cpio.file(&format!("modules/{file}"), 0o644, &bytes);
            order.push(file);
        }
    }
    cpio.file("modules/order", 0o644, order.join("\n").as_bytes());
    Ok(cpio.finish())
}

/// A newc cpio archive, what the kernel unpacks as initramfs.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn node(&mut self, name: &str, mode: u32, rdev: (u32, u32)) {
        self.entry(name, mode, rdev, &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// A child process killed (SIGKILL) and reaped when dropped: no qemu and no host test outlives a
/// run, whether it ends, fails, or times out. `group`: the child leads its own process group
/// (the host job and the tests it starts) and the whole group is killed, by its id.
struct Proc {
    child: Child,
    group: bool,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            if self.group {
                let pgid = format!("-{}", self.child.id());
                let _ = Command::new("kill").args(["-KILL", "--", &pgid]).status();
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Boots `kernel` with the job and collects its row.
fn run_vm(
    kernel: &Kernel,
    tests: &[Test],
    agent: &Path,
    opts: &Options,
    logs: &Path,
) -> anyhow::Result<Row> {
    let (skipped, run): (Vec<&Test>, Vec<&Test>) = tests
        .iter()
        .partition(|t| !opts.heavy && heavy(&t.label).is_some());
    let work = cache_dir().join("run").join(&kernel.release);
    std::fs::create_dir_all(&work)?;
    let initrd = work.join("initramfs.cpio");
    // The guest mounts tmpfs over /tmp, /run and /var/tmp: what the job reads from there (a
    // checkout cloned to /tmp, say) is bound back over it (`guest/init`).
    let mut needed = vec![root(), agent.to_path_buf(), kernel.tree.clone()];
    needed.extend(run.iter().map(|t| t.exe.clone()));
    let mut keep = Vec::new();
    for dir in ["/tmp", "/run", "/var/tmp"] {
        keep.extend(
            entries_under(dir, &needed)?
                .into_iter()
                .map(|e| format!("{dir}/{e}")),
        );
    }
    let job = job(&run, agent, opts.jobs);
    std::fs::write(&initrd, initramfs(kernel, &job, &keep)?)?;
    let pidfile = work.join("qemu.pid");
    kill_stale(&pidfile);
    eprintln!(
        "kernels: {}: booting (qemu TCG, 2 vCPUs, {} MiB), {} tests ({} at a time), {} left out",
        kernel.release,
        opts.memory,
        run.len(),
        opts.jobs,
        skipped.len()
    );
    let vmlinuz = kernel
        .tree
        .join("boot")
        .join(format!("vmlinuz-{}", kernel.release));
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"])
        .args(["-m", &opts.memory.to_string()])
        // No network device, no display, no reboot: the guest's poweroff (or panic) ends qemu.
        .args([
            "-nodefaults",
            "-nic",
            "none",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off random.trust_cpu=on",
        ])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-pidfile")
        .arg(&pidfile)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (`cargo xtask setup` installs it)")?;
    let row = console(
        Proc {
            child,
            group: false,
        },
        kernel.release.clone(),
        tests,
        &skipped,
        Duration::from_secs(opts.timeout),
        &logs.join(format!("{}.log", kernel.release)),
    );
    let _ = std::fs::remove_file(&pidfile);
    row
}

/// Kills the qemu a previous, interrupted run left behind (found by its pidfile, checked by its
/// command line so an unrelated process that reused the pid is left alone).
fn kill_stale(pidfile: &Path) {
    let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*pidfile.to_string_lossy()));
    if ours {
        eprintln!("kernels: killing qemu {pid} left by an earlier run");
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let _ = std::fs::remove_file(pidfile);
}

/// Reads the job's output (the VM's serial console, or the host script's stdout) until it ends or
/// `limit` passes, writing it to `log` and the progress to stderr.
fn console(
    mut proc: Proc,
    title: String,
    tests: &[Test],
    skipped: &[&Test],
    limit: Duration,
    log: &Path,
) -> anyhow::Result<Row> {
    let started = Instant::now();
    let mut file = std::fs::File::create(log)?;
    let (tx, rx) = mpsc::channel::<String>();
    for stream in [
        proc.child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        proc.child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&buf).replace('\r', "");
                if tx.send(line.trim_end_matches('\n').to_string()).is_err() {
                    break;
                }
                buf.clear();
            }
        });
    }
    drop(tx);
    let mut row = Row {
        title,
        results: BTreeMap::new(),
        probes: BTreeMap::new(),
        boot: None,
        total: Duration::ZERO,
        log: log.to_path_buf(),
        aborted: None,
    };
    for t in skipped {
        row.results
            .insert(t.label.clone(), (Status::Skipped, Duration::ZERO, None));
    }
    let mut current: Option<(String, Vec<String>)> = None;
    let mut exit: Option<i32> = None;
    loop {
        let Some(left) = limit.checked_sub(started.elapsed()) else {
            row.aborted = Some(format!("timed out after {} s", limit.as_secs()));
            break;
        };
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let _ = writeln!(file, "{line}");
        if let Some(rest) = marker(&line, "mesh-vm: ready") {
            row.boot = Some(started.elapsed());
            eprintln!(
                "kernels: {}: booted in {:.1} s (guest uptime {rest} s)",
                row.title,
                started.elapsed().as_secs_f64()
            );
        } else if let Some(rest) = marker(&line, "mesh-vm: exit") {
            exit = rest.trim().parse().ok();
        } else if let Some(rest) = marker(&line, "mesh-probe") {
            if let Some((k, v)) = rest.trim().split_once(' ') {
                row.probes.insert(k.to_string(), v.to_string());
            }
        } else if let Some(rest) = marker(&line, "mesh-test-begin") {
            current = Some((rest.trim().to_string(), Vec::new()));
        } else if let Some(rest) = marker(&line, "mesh-test-end") {
            let mut f = rest.split_whitespace();
            let (label, rc, ms) = (f.next(), f.next(), f.next());
            let (Some(label), Some(rc), Some(ms)) = (label, rc, ms) else {
                continue;
            };
            let rc: i32 = rc.parse().unwrap_or(-1);
            let took = Duration::from_millis(ms.parse().unwrap_or(0));
            let lines = current.take().map(|(_, l)| l).unwrap_or_default();
            let status = match rc {
                0 => Status::Pass,
                124 | 137 => Status::Timeout,
                rc => Status::Fail(rc),
            };
            let why = (status != Status::Pass).then(|| key_error(&lines));
            eprintln!(
                "kernels: {}: {label} {} ({:.1} s){}",
                row.title,
                status.cell(),
                took.as_secs_f64(),
                why.as_ref().map(|w| format!(": {w}")).unwrap_or_default()
            );
            row.results.insert(label.to_string(), (status, took, why));
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line);
        }
    }
    if let Some((label, lines)) = current.take() {
        row.results.insert(
            label,
            (Status::Timeout, Duration::ZERO, Some(key_error(&lines))),
        );
    }
    row.total = started.elapsed();
    drop(proc);
    for t in tests {
        row.results
            .entry(t.label.clone())
            .or_insert((Status::NotRun, Duration::ZERO, None));
    }
    if row.aborted.is_none() && exit.is_none() && row.title.starts_with("host") {
        exit = Some(0);
    }
    if row.aborted.is_none() && exit.is_none() {
        row.aborted = Some("the VM stopped without reporting an exit code".into());
    }
    Ok(row)
}

/// The text after `tag` if the line carries it (serial output can glue it to a previous line).
fn marker<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    line.find(tag).map(|i| &line[i + tag.len()..])
}

/// The line of a failed test's output that says why: the agent's own error (an `ERROR` log
/// line, or the `Error:` it exits with), else the panic message.
fn key_error(lines: &[String]) -> String {
    let agent_error = lines.iter().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l.trim()).ok()?;
        (v["level"] == "ERROR").then(|| {
            // tracing-subscriber's JSON puts fields at the top level or under `fields`.
            let field = |k: &str| v[k].as_str().or_else(|| v["fields"][k].as_str());
            let mut s = field("message").unwrap_or_default().to_string();
            if let Some(e) = field("error") {
                let _ = write!(s, ": {e}");
            }
            s
        })
    });
    let exit_error = || {
        lines
            .iter()
            .find(|l| l.trim_start().starts_with("Error:"))
            .map(|l| l.trim().to_string())
    };
    // The panic message, with `left:`/`right:` of a failed assert_eq on the same line.
    let panic = || {
        let i = lines.iter().position(|l| l.contains("panicked at"))?;
        let mut s = lines.get(i + 1)?.trim().to_string();
        for l in lines.iter().skip(i + 2).take(2) {
            let l = l.trim();
            if l.starts_with("left:") || l.starts_with("right:") {
                let _ = write!(s, " {l}");
            }
        }
        Some(s)
    };
    let mut s = agent_error
        .or_else(exit_error)
        .or_else(panic)
        .or_else(|| lines.iter().rev().find(|l| !l.trim().is_empty()).cloned())
        .unwrap_or_else(|| "no output".into());
    if s.chars().count() > 220 {
        s = s.chars().take(217).collect::<String>() + "...";
    }
    s
}

/// The kernel x test table, the failures with their key line, and what each kernel supports.
fn report(tests: &[Test], rows: &[Row], opts: &Options) -> String {
    let mut s = String::new();
    let w = tests
        .iter()
        .map(|t| t.label.len())
        .max()
        .unwrap_or(4)
        .max(24);
    let cw = rows
        .iter()
        .map(|r| r.title.len())
        .max()
        .unwrap_or(0)
        .max(14)
        + 2;
    let _ = writeln!(s, "\nkernels: test results");
    let _ = write!(s, "{:w$}", "test");
    for r in rows {
        let _ = write!(s, "  {:cw$}", r.title);
    }
    let _ = writeln!(s);
    for t in tests {
        let _ = write!(s, "{:w$}", t.label);
        for r in rows {
            let cell = match r.results.get(&t.label) {
                Some((st @ (Status::Pass | Status::Fail(_) | Status::Timeout), d, _)) => {
                    format!("{} {:.1}s", st.cell(), d.as_secs_f64())
                }
                Some((st, _, _)) => st.cell().to_string(),
                None => "-".into(),
            };
            let _ = write!(s, "  {cell:cw$}");
        }
        let _ = writeln!(s);
    }
    let mut line = |name: &str, f: &dyn Fn(&Row) -> String| {
        let _ = write!(s, "{name:w$}");
        for r in rows {
            let _ = write!(s, "  {:cw$}", f(r));
        }
        let _ = writeln!(s);
    };
    line("passed", &|r| {
        let ran = r
            .results
            .values()
            .filter(|(st, _, _)| *st != Status::Skipped)
            .count();
        let ok = r
            .results
            .values()
            .filter(|(st, _, _)| *st == Status::Pass)
            .count();
        format!("{ok}/{ran}")
    });
    line("boot", &|r| {
        r.boot
            .map_or("-".into(), |b| format!("{:.1}s", b.as_secs_f64()))
    });
    line("total", &|r| format!("{:.0}s", r.total.as_secs_f64()));
    let skipped: Vec<&(&str, &str)> = HEAVY
        .iter()
        .filter(|(l, _)| tests.iter().any(|t| t.label == *l))
        .collect();
    if !opts.heavy && !skipped.is_empty() && rows.iter().any(|r| !r.title.starts_with("host")) {
        let _ = writeln!(
            s,
            "\nskip: left out in VMs (TCG) unless --heavy, they pass on the host:"
        );
        for (l, why) in skipped {
            let _ = writeln!(s, "  {l}: {why}");
        }
    }
    let mut failures = String::new();
    for r in rows {
        if let Some(why) = &r.aborted {
            let _ = writeln!(failures, "  {}: run aborted: {why}", r.title);
        }
        for (label, (st, _, why)) in &r.results {
            if matches!(st, Status::Fail(_) | Status::Timeout) {
                let _ = writeln!(
                    failures,
                    "  {} {label} ({}): {}",
                    r.title,
                    st.cell(),
                    why.as_deref().unwrap_or("")
                );
            }
        }
    }
    if !failures.is_empty() {
        let _ = writeln!(
            s,
            "\nfailures (key line; full output in the logs below):\n{failures}"
        );
    }
    let _ = writeln!(
        s,
        "\nkernel features (probes in the guest, and what the tests showed):"
    );
    let mut feature = |name: &str, f: &dyn Fn(&Row) -> String| {
        let _ = write!(s, "{name:w$}");
        for r in rows {
            let _ = write!(s, "  {:cw$}", f(r));
        }
        let _ = writeln!(s);
    };
    let probe = |key: &'static str| move |r: &Row| r.probes.get(key).cloned().unwrap_or("?".into());
    feature("BTF /sys/kernel/btf/vmlinux", &probe("btf"));
    feature("prog sched_cls", &probe("prog-sched_cls"));
    feature("prog xdp", &probe("prog-xdp"));
    feature("map lpm_trie", &probe("map-lpm_trie"));
    feature("map sockmap", &probe("map-sockmap"));
    feature("helper bpf_sk_assign (tc)", &probe("helper-bpf_sk_assign"));
    feature(
        "helper bpf_skc_lookup_tcp",
        &probe("helper-bpf_skc_lookup_tcp"),
    );
    feature("module veth", &probe("module-veth"));
    feature("module sch_ingress", &probe("module-sch_ingress"));
    feature("module cls_bpf", &probe("module-cls_bpf"));
    feature("agent TC attach (TCX >= 6.6, else netlink)", &|r| {
        suite_verdict(r, &["capture::", "xdp::", "http::"])
    });
    feature("XDP attach on veth", &|r| suite_verdict(r, &["authz::"]));
    let _ = writeln!(s, "\nlogs:");
    for r in rows {
        let _ = writeln!(s, "  {}: {}", r.title, r.log.display());
    }
    s
}

/// `yes` if a test of these suites passed (each one attaches the program that way), `no` with the
/// attach error if they all failed on one, else `?`.
fn suite_verdict(r: &Row, prefixes: &[&str]) -> String {
    let of = || {
        r.results
            .iter()
            .filter(|(l, _)| prefixes.iter().any(|p| l.starts_with(p)))
    };
    if of().any(|(_, (st, _, _))| *st == Status::Pass) {
        return "yes".into();
    }
    if of().any(|(_, (_, _, why))| why.as_deref().is_some_and(|w| w.contains("attach"))) {
        return "no (attach error)".into();
    }
    "?".into()
}
