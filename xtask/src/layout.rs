//! `cargo xtask layout`: regenerates `mesh-agent/hot-text.order`, the agent's functions that run
//! at start-up and on the data path, in the order they first run. `mesh-agent/build.rs` hands the
//! file to the linker (`--symbol-ordering-file`), which places those functions first in `.text`.
//!
//! Why: the kernel maps a program's code 64 KiB at a time around each page that runs
//! (fault-around). An idle agent runs about 650 KB of its 18 MB of code, but spread over the whole
//! text those pages kept 8.5 MB of it mapped, most of the idle RSS. Placed together, they fill
//! few 64 KiB windows.
//!
//! How: the quick benchmark (every data-path scenario, briefly) runs with the agent traced by
//! `xtask/layout/trace.c`, which records each 4 KiB page of code the first time it runs. Every
//! function that overlaps a recorded page is listed, page by page in the order they ran.
//!
//! Symbol names carry the hashes of their crates' build metadata: a new toolchain or new
//! dependency versions change them, and functions added since the last run are not listed. Both
//! only make the layout less tight, never wrong; the benchmark prints how much of the list the
//! agent it measures still matches (see [`coverage`]): regenerate when that falls.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _, SymbolKind};

use crate::bench::data_path;
use crate::util::{build_release, exec, root};

/// The ordering file, relative to the workspace root.
pub const ORDER_FILE: &str = "mesh-agent/hot-text.order";

pub fn run() -> anyhow::Result<()> {
    if !mesh_tests::privileged("layout") {
        bail!("tracing the agent needs root (BPF, network namespaces)");
    }
    let agent = build_release()?.0.canonicalize()?;
    let dir = std::env::temp_dir().join(format!("mesh-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tracer = dir.join("trace.so");
    exec(
        std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
            .arg(&tracer)
            .arg(root().join("xtask/layout/trace.c"))
            .arg("-ldl"),
    )
    .context("compiling the tracer (needs a C compiler)")?;
    let trace = dir.join("pages.txt");
    let (tracer_s, agent_s, trace_s) = (
        tracer.display().to_string(),
        agent.display().to_string(),
        trace.display().to_string(),
    );
    let results = data_path::run_with(
        data_path::Plan::QUICK,
        &agent,
        &[
            ("LD_PRELOAD", &tracer_s),
            ("TRACE_BIN", &agent_s),
            ("TRACE_OUT", &trace_s),
        ],
    )?;
    let failed = results.rows.iter().flat_map(|r| r.failures()).count();
    if failed > 0 {
        eprintln!("note: {failed} scenario(s) failed under the tracer; their code is missing");
    }
    let text = std::fs::read_to_string(&trace).context("the tracer wrote no pages")?;
    let mut seen = HashSet::new();
    let pages: Vec<u64> = text
        .lines()
        .filter_map(|l| u64::from_str_radix(l.trim(), 16).ok())
        .filter(|p| seen.insert(*p))
        .collect();
    let binary = std::fs::read(&agent)?;
    let hot = hot_functions(&binary, &pages)?;
    let size: u64 = hot.iter().map(|(_, s)| s).sum();
    let mut out = String::from(
        "# The agent's functions that ran at start-up and in the quick benchmark, in the order\n\
         # they first ran: the linker places them first in .text. Written by `cargo xtask layout`.\n",
    );
    for (name, _) in &hot {
        out.push_str(name);
        out.push('\n');
    }
    let file = root().join(ORDER_FILE);
    std::fs::write(&file, out)?;
    println!(
        "{} pages of code ran; {} functions ({} KiB) written to {}",
        pages.len(),
        hot.len(),
        size / 1024,
        file.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The functions overlapping each page (file offsets) of `binary`'s code, in page order,
/// each once, with its size.
fn hot_functions(binary: &[u8], pages: &[u64]) -> anyhow::Result<Vec<(String, u64)>> {
    let elf = object::File::parse(binary).context("parsing the agent binary")?;
    // File offset -> address: per loadable segment.
    let segments: Vec<(u64, u64, u64)> = elf
        .segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            (offset, size, s.address())
        })
        .collect();
    let mut functions: Vec<(u64, u64, String)> = elf
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0 && s.is_definition())
        .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_owned())))
        .collect();
    if functions.is_empty() {
        bail!("the agent binary has no symbol table (stripped?)");
    }
    functions.sort();
    let mut listed = HashSet::new();
    let mut hot = Vec::new();
    for &page in pages {
        let Some(&(offset, _, address)) = segments
            .iter()
            .find(|(offset, size, _)| (*offset..offset + size).contains(&page))
        else {
            continue;
        };
        let (start, end) = (page - offset + address, page - offset + address + 4096);
        // The first function that ends after the page starts, then on while they start in it.
        let first = functions.partition_point(|(a, s, _)| a + s <= start);
        for (a, s, name) in functions[first..].iter().take_while(|(a, _, _)| *a < end) {
            if a + s > start && listed.insert(name.as_str()) {
                hot.push((name.clone(), *s));
            }
        }
    }
    Ok(hot)
}

/// How many of the ordering file's functions `agent` has, of how many listed: the share the
/// linker could place. Printed by the benchmark.
pub fn coverage(agent: &Path) -> anyhow::Result<(usize, usize)> {
    let listed = listed(&root().join(ORDER_FILE))?;
    let binary = std::fs::read(agent)?;
    let elf = object::File::parse(&*binary).context("parsing the agent binary")?;
    let present: HashSet<&str> = elf.symbols().filter_map(|s| s.name().ok()).collect();
    let found = listed
        .iter()
        .filter(|n| present.contains(n.as_str()))
        .count();
    Ok((found, listed.len()))
}

fn listed(file: &PathBuf) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}
