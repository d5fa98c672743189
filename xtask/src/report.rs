//! `cargo xtask bench-report`: reads criterion's saved results and writes
//! `target/hetmem-report/report.md`: the targets of the project, the size sweep as tables
//! (GB/s and ratio to the memcpy of the same bytes, same run) and, for every other group,
//! each case's time, throughput and ratio; and PNG plots under `plots/` (throughput against
//! size per method, bookkeeping ns per page against batch size).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// One measured case.
struct Case {
    mean_ns: f64,
    /// Bytes (or elements) per iteration, and whether they are bytes.
    throughput: Option<(f64, bool)>,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn read_case(dir: &Path) -> Option<Case> {
    let est: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("new/estimates.json")).ok()?)
            .ok()?;
    let mean_ns = est["mean"]["point_estimate"].as_f64()?;
    let bench: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("new/benchmark.json")).ok()?)
            .ok()?;
    let t = &bench["throughput"];
    let throughput = t["Bytes"]
        .as_f64()
        .map(|b| (b, true))
        .or_else(|| t["Elements"].as_f64().map(|e| (e, false)));
    Some(Case {
        mean_ns,
        throughput,
    })
}

/// The memcpy case a case is compared with, within its group.
fn baseline<'a>(case: &str, names: &'a [String]) -> Option<&'a String> {
    let memcpys: Vec<&String> = names.iter().filter(|n| n.starts_with("memcpy")).collect();
    if case.contains("scattered") {
        if let Some(s) = memcpys.iter().find(|n| n.contains("scattered")) {
            return Some(s);
        }
    }
    memcpys
        .iter()
        .find(|n| !n.contains("scattered"))
        .or(memcpys.first())
        .copied()
}

/// Every case criterion measured, by group, read from its results under `root`.
fn read_groups(root: &Path) -> Result<Groups> {
    let mut groups = Groups::new();
    for g in std::fs::read_dir(root).with_context(|| {
        format!(
            "no criterion results in {} (run cargo bench)",
            root.display()
        )
    })? {
        let g = g?;
        if !g.file_type()?.is_dir() || g.file_name() == "report" {
            continue;
        }
        for c in std::fs::read_dir(g.path())? {
            let c = c?;
            if let Some(case) = read_case(&c.path()) {
                groups
                    .entry(g.file_name().to_string_lossy().into_owned())
                    .or_default()
                    .insert(c.file_name().to_string_lossy().into_owned(), case);
            }
        }
    }
    Ok(groups)
}

pub fn run(machine: Option<String>, copy_to: Option<PathBuf>) -> Result<()> {
    let root = target_dir().join("criterion");
    let groups = read_groups(&root)?;
    let out = target_dir().join("hetmem-report");
    let plots_dir = out.join("plots");
    std::fs::create_dir_all(&plots_dir)?;
    let plots = match crate::plots::init_font() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("plots left out: {e}");
            false
        }
    };
    let mut md = String::new();
    writeln!(md, "# hetmem benchmark report\n")?;
    writeln!(
        md,
        "Machine: {} ({} cores). Generated from criterion's results by `cargo xtask bench-report`. \
         Ratios compare each case with the memcpy of the same bytes measured in the same group \
         (same run); above 1 is faster than memcpy.\n",
        machine.as_deref().unwrap_or("not given"),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )?;
    let hmm = read_hmm(&root);
    targets(&mut md, &groups, hmm.as_ref())?;
    pointer_targets(&mut md, &root)?;
    sweep(&mut md, &groups, plots.then_some(plots_dir.as_path()))?;
    if plots {
        bookkeeping_plot(&mut md, &groups, &plots_dir)?;
    }
    if let Some(hmm) = &hmm {
        hmm_tables(&mut md, hmm)?;
    }
    writeln!(md, "## Every other group\n")?;
    for (group, cases) in groups.iter().filter(|(g, _)| !g.starts_with("sweep_")) {
        let names: Vec<String> = cases.keys().cloned().collect();
        writeln!(md, "### {group}\n")?;
        writeln!(md, "| case | mean | throughput | x memcpy |")?;
        writeln!(md, "|---|---:|---:|---:|")?;
        // Numeric case names (batch sizes, byte counts) in numeric order, the rest by name.
        let mut rows: Vec<(&String, &Case)> = cases.iter().collect();
        rows.sort_by_key(|(name, _)| (name.parse::<u64>().ok(), name.as_str()));
        for (name, c) in rows {
            let thr = match c.throughput {
                Some((b, true)) => format!("{:.2} GB/s", b / c.mean_ns),
                Some((e, false)) => format!("{:.1} ns/elem", c.mean_ns / e),
                None => "-".into(),
            };
            let ratio = baseline(name, &names)
                .filter(|b| *b != name)
                .and_then(|b| cases.get(b))
                .map_or("-".into(), |b| format!("{:.2}", b.mean_ns / c.mean_ns));
            writeln!(
                md,
                "| {name} | {:.3} ms | {thr} | {ratio} |",
                c.mean_ns / 1e6
            )?;
        }
        writeln!(md)?;
    }
    let path = out.join("report.md");
    std::fs::write(&path, &md)?;
    println!("wrote {} ({} groups)", path.display(), groups.len());
    if let Some(to) = copy_to {
        // Plots go to `<stem>-plots/` beside the copy, and its links follow them.
        let stem = to
            .file_stem()
            .map_or("report".into(), |s| s.to_string_lossy().into_owned());
        let to_plots = to.with_file_name(format!("{stem}-plots"));
        std::fs::create_dir_all(&to_plots)?;
        for f in std::fs::read_dir(&plots_dir)? {
            let f = f?;
            std::fs::copy(f.path(), to_plots.join(f.file_name()))?;
        }
        std::fs::write(&to, md.replace("](plots/", &format!("]({stem}-plots/")))?;
        println!("copied to {} and {}", to.display(), to_plots.display());
    }
    Ok(())
}

type Groups = BTreeMap<String, BTreeMap<String, Case>>;

/// The sweep's methods, in table order, with their labels.
const METHODS: &[(&str, &str)] = &[
    ("memcpy", "memcpy"),
    ("hetmem_batch", "hetmem batch"),
    ("hetmem_migrate", "hetmem migrate"),
    ("hetmem_prefetch", "hetmem prefetch"),
    ("per_block_loop", "per-block loop"),
    ("wgpu_naive", "naive wgpu"),
];
const DIRECTIONS: &[(&str, &str)] = &[
    ("up", "host -> device"),
    ("down", "device -> host"),
    ("round", "round trip"),
];
const LAYOUTS: &[(&str, &str)] = &[
    ("contig", "one contiguous run"),
    ("blk4k", "scattered 4 KiB blocks"),
    ("blk16k", "scattered 16 KiB blocks"),
    ("blk64k", "scattered 64 KiB blocks"),
];

/// Bytes of a size name such as `64KiB` or `256MiB`.
fn size_bytes(name: &str) -> Option<u64> {
    let (num, unit) = name.split_at(name.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    match unit {
        "KiB" => Some(n << 10),
        "MiB" => Some(n << 20),
        "GiB" => Some(n << 30),
        _ => None,
    }
}

/// The sweep's groups of one direction and layout: (bytes, size name, cases), by size.
fn sweep_rows<'a>(
    groups: &'a Groups,
    dir: &str,
    layout: &str,
) -> Vec<(u64, &'a str, &'a BTreeMap<String, Case>)> {
    let prefix = format!("sweep_{dir}_{layout}_");
    let mut rows: Vec<_> = groups
        .iter()
        .filter_map(|(g, c)| {
            let size = g.strip_prefix(&prefix)?;
            Some((size_bytes(size)?, size, c))
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    rows
}

fn gbps(c: &Case) -> Option<f64> {
    match c.throughput {
        Some((b, true)) => Some(b / c.mean_ns),
        _ => None,
    }
}

/// The sweep as one table per direction and layout, with a plot each.
fn sweep(md: &mut String, groups: &Groups, plots: Option<&Path>) -> Result<()> {
    if !groups.keys().any(|g| g.starts_with("sweep_")) {
        return Ok(());
    }
    writeln!(md, "## Size sweep (`cargo bench --bench sweep`)\n")?;
    writeln!(
        md,
        "GB/s, and in brackets the ratio to the memcpy of the same bytes in the same group. \
         hetmem migrate / prefetch move the pages of a virtual range, so they appear in the \
         contiguous tables only; '-' is a case not run (the per-block paths stop at \
         `HETMEM_SWEEP_SLOW_MAX`, 16 MiB by default, besides the 256 MiB round trip in 4 KiB \
         blocks that the targets use).\n"
    )?;
    for &(dir, dir_label) in DIRECTIONS {
        for &(layout, layout_label) in LAYOUTS {
            let rows = sweep_rows(groups, dir, layout);
            if rows.is_empty() {
                continue;
            }
            writeln!(md, "### {dir_label}, {layout_label}\n")?;
            let used: Vec<&(&str, &str)> = METHODS
                .iter()
                .filter(|(m, _)| rows.iter().any(|r| r.2.contains_key(*m)))
                .collect();
            write!(md, "| size |")?;
            for (_, label) in &used {
                write!(md, " {label} |")?;
            }
            writeln!(md)?;
            write!(md, "|---|")?;
            for _ in &used {
                write!(md, "---:|")?;
            }
            writeln!(md)?;
            for (_, size, cases) in &rows {
                write!(md, "| {size} |")?;
                let base = cases.get("memcpy");
                for (m, _) in &used {
                    match cases.get(*m) {
                        Some(c) => {
                            let g = gbps(c).unwrap_or(0.0);
                            match base.filter(|_| *m != "memcpy") {
                                Some(b) => write!(md, " {g:.2} ({:.2}x) |", b.mean_ns / c.mean_ns)?,
                                None => write!(md, " {g:.2} |")?,
                            }
                        }
                        None => write!(md, " - |")?,
                    }
                }
                writeln!(md)?;
            }
            writeln!(md)?;
            if let Some(dir_path) = plots {
                let file = format!("sweep_{dir}_{layout}.png");
                let series: Vec<crate::plots::Series> = used
                    .iter()
                    .map(|(m, label)| crate::plots::Series {
                        name: label.to_string(),
                        points: rows
                            .iter()
                            .filter_map(|(bytes, _, c)| {
                                Some(((*bytes as f64) / 1024.0, gbps(c.get(*m)?)?))
                            })
                            .collect(),
                    })
                    .collect();
                crate::plots::log_log(
                    &dir_path.join(&file),
                    &format!("{dir_label}, {layout_label}"),
                    "size (KiB)",
                    "GB/s",
                    &series,
                )?;
                writeln!(md, "![{dir_label}, {layout_label}](plots/{file})\n")?;
            }
        }
    }
    Ok(())
}

/// Bookkeeping ns per page against batch size.
fn bookkeeping_plot(md: &mut String, groups: &Groups, dir: &Path) -> Result<()> {
    let Some(cases) = groups.get("bookkeeping") else {
        return Ok(());
    };
    let mut points: Vec<(f64, f64)> = cases
        .iter()
        .filter_map(|(n, c)| {
            let pages: f64 = n.parse().ok()?;
            let (elems, false) = c.throughput? else {
                return None;
            };
            Some((pages, c.mean_ns / elems))
        })
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    crate::plots::log_log(
        &dir.join("bookkeeping.png"),
        "migration bookkeeping (setup + pages + finalize, copy excluded)",
        "pages per migration",
        "ns per page",
        &[crate::plots::Series {
            name: "ns/page".into(),
            points,
        }],
    )?;
    writeln!(md, "![bookkeeping](plots/bookkeeping.png)\n")?;
    Ok(())
}

/// The targets of the 256 MiB round trip: beside two memcpys (both benches), and beside a
/// naive wgpu copy and a per-block loop in 4 KiB blocks.
fn round_trip_targets(groups: &Groups) -> Vec<(String, String, String)> {
    let mean = |g: &str, c: &str| groups.get(g).and_then(|x| x.get(c)).map(|c| c.mean_ns);
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let own = "round_trip_256MiB";
    if let (Some(h), Some(m)) = (
        mean(own, "hetmem_4KiB_pages"),
        mean(own, "memcpy_there_and_back"),
    ) {
        let r = m / h;
        rows.push((
            "256 MiB round trip vs two memcpys (`--bench migrate`, fresh frame pool; issue 10)"
                .into(),
            format!("{r:.2}x"),
            verdict(r >= 0.85, ">= 0.85x"),
        ));
    }
    let rt = "sweep_round_contig_256MiB";
    if let (Some(h), Some(m)) = (mean(rt, "hetmem_migrate"), mean(rt, "memcpy")) {
        let r = m / h;
        rows.push((
            "256 MiB round trip vs two memcpys (`--bench sweep`, pool used by smaller sizes)"
                .into(),
            format!("{r:.2}x"),
            verdict(r >= 0.7, ">= 0.7x"),
        ));
    }
    let rt4 = "sweep_round_blk4k_256MiB";
    if let Some(h) = mean(rt, "hetmem_migrate") {
        for (m, label, want) in [
            ("wgpu_naive", "naive wgpu", 3.0),
            ("per_block_loop", "per-block loop", 2.0),
        ] {
            if let Some(x) = mean(rt4, m) {
                let r = x / h;
                rows.push((
                    format!("256 MiB round trip (migrate) vs {label} in 4 KiB blocks"),
                    format!("{r:.2}x"),
                    verdict(r >= want, &format!(">= {want}x")),
                ));
            }
        }
    }
    rows
}

/// The project's targets, each with the figures it rests on.
fn targets(md: &mut String, groups: &Groups, hmm: Option<&serde_json::Value>) -> Result<()> {
    let mut rows = round_trip_targets(groups);
    if let Some(cases) = groups.get("bookkeeping") {
        let worst = cases
            .iter()
            .filter(|(n, _)| n.parse::<u64>().is_ok_and(|n| n >= 512))
            .filter_map(|(_, c)| Some(c.mean_ns / c.throughput?.0))
            .fold(f64::NAN, f64::max);
        if worst.is_finite() {
            rows.push((
                "bookkeeping, worst batch of >= 512 pages (issue 10)".into(),
                format!("{worst:.0} ns/page"),
                verdict(worst <= 60.0, "<= 60 ns"),
            ));
        }
    }
    let one_page = hmm
        .and_then(|h| h["fault_back"].as_array())
        .and_then(|f| f.iter().find(|r| r["window"] == 1));
    if let Some(r) = one_page {
        rows.push((
            "CPU fault-back of one 4 KiB page (`--bench hmm`)".into(),
            format!(
                "p50 {:.1} us, p99 {:.1} us",
                r["p50_us"].as_f64().unwrap_or(f64::NAN),
                r["p99_us"].as_f64().unwrap_or(f64::NAN)
            ),
            "reported (no target yet)".into(),
        ));
    }
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(md, "## Targets\n")?;
    writeln!(md, "| target | this run | verdict |")?;
    writeln!(md, "|---|---:|---|")?;
    for (t, v, ok) in rows {
        writeln!(md, "| {t} | {v} | {ok} |")?;
    }
    writeln!(md)?;
    Ok(())
}

/// The two figures of CPU pointers (`cargo bench --bench pointers`): a one-page fault through
/// a plain load beside the bare userfaultfd round trip, and a sequential scan of a
/// device-resident buffer beside the host-resident one.
fn pointer_targets(md: &mut String, root: &Path) -> Result<()> {
    let read = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(root.join(name)).ok()?).ok()
    };
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let mut rows: Vec<(String, String, String)> = Vec::new();
    if let Some(p) = read("hetmem-pointers.json") {
        let load = &p["plain load"];
        let bare = &p["bare userfaultfd round trip"];
        let read = &p["Buffer::read"];
        let ratio = f(&p["load_over_bare_p50"]);
        rows.push((
            format!(
                "one-page fault through a plain load ({}); Buffer::read p50 {:.1} us, bare {}",
                p["device"].as_str().unwrap_or("?"),
                f(&read["p50_us"]),
                format_args!(
                    "userfaultfd round trip p50 {:.1} us / p99 {:.1} us, bare UFFDIO_COPY round \
                     trip (the design not taken) p50 {:.1} us",
                    f(&bare["p50_us"]),
                    f(&bare["p99_us"]),
                    f(&p["bare UFFDIO_COPY round trip (design not taken)"]["p50_us"])
                )
            ),
            format!(
                "p50 {:.1} us, p99 {:.1} us ({ratio:.2}x bare)",
                f(&load["p50_us"]),
                f(&load["p99_us"])
            ),
            verdict(
                ratio <= 2.0 && f(&load["p50_us"]) <= 30.0,
                "p50 <= 2x bare and <= 30 us",
            ),
        ));
    }
    if let Some(s) = read("hetmem-pointer-scan.json") {
        let r = f(&s["ratio"]);
        rows.push((
            format!(
                "sequential scan of 256 MiB through a pointer, device-resident vs host-resident ({:.2} vs {:.2} GB/s)",
                f(&s["device_gbs"]),
                f(&s["host_gbs"])
            ),
            format!("{r:.2}x"),
            verdict(r >= 0.5, ">= 0.5x"),
        ));
    }
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(md, "## CPU pointers\n")?;
    writeln!(md, "| target | this run | verdict |")?;
    writeln!(md, "|---|---:|---|")?;
    for (t, v, ok) in rows {
        writeln!(md, "| {t} | {v} | {ok} |")?;
    }
    writeln!(md)?;
    Ok(())
}

/// The results `cargo bench --bench hmm` saved beside criterion's (see
/// `hetmem_bench::save_results`), if that bench ran.
fn read_hmm(root: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(root.join("hetmem-hmm.json")).ok()?).ok()
}

/// The kernel HMM self-test's table (with the memcpy of the same bytes, timed the same way
/// in the same run) and the fault-back latencies.
fn hmm_tables(md: &mut String, hmm: &serde_json::Value) -> Result<()> {
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    if let Some(rows) = hmm["table"]["rows"].as_array() {
        writeln!(
            md,
            "## Kernel HMM self-test table (`cargo bench --bench hmm`)
"
        )?;
        writeln!(
            md,
            "The shape of the kernel's `hmm-tests` benchmark: {} through `GpuDriver`, 4 KiB \
             pages, mean of 5 after a warm-up, each way; x memcpy compares with a memcpy of the \
             same bytes timed the same way in the same run.\n",
            hmm["table"]["device"].as_str().unwrap_or("the device")
        )?;
        writeln!(
            md,
            "| size | Sys->Dev ms | GB/s | x memcpy | Dev->Sys ms | GB/s | x memcpy |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---:|---:|---:|")?;
        for r in rows {
            let bytes = f(&r["bytes"]);
            let memcpy = f(&r["memcpy_ns"]);
            write!(md, "| {} |", r["size"].as_str().unwrap_or("?"))?;
            for key in ["sys_to_dev_ns", "dev_to_sys_ns"] {
                let t = f(&r[key]);
                write!(
                    md,
                    " {:.3} | {:.2} | {:.2} |",
                    t / 1e6,
                    bytes / t,
                    memcpy / t
                )?;
            }
            writeln!(md)?;
        }
        writeln!(md)?;
    }
    if let Some(rows) = hmm["fault_back"].as_array() {
        writeln!(
            md,
            "## CPU fault-back latency (`cargo bench --bench hmm`)
"
        )?;
        writeln!(
            md,
            "A CPU read of a device-private page, through `migrate_to_ram`: 2 000 faults each.\n"
        )?;
        writeln!(md, "| fault-around window | p50 | p99 |")?;
        writeln!(md, "|---:|---:|---:|")?;
        for r in rows {
            writeln!(
                md,
                "| {} page(s) | {:.1} us | {:.1} us |",
                r["window"],
                f(&r["p50_us"]),
                f(&r["p99_us"])
            )?;
        }
        writeln!(md)?;
    }
    Ok(())
}

fn verdict(ok: bool, want: &str) -> String {
    if ok {
        format!("met ({want})")
    } else {
        format!("NOT met ({want})")
    }
}
