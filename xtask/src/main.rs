//! `cargo xtask`: the project's task runner.
//!
//! - `cargo xtask demo`: set up what is missing, then run the demo.
//! - `cargo xtask test`: set up what is missing, then run every test of the workspace and a
//!   short soak per device and memory kind.
//! - `cargo xtask soak`: threads of random operations against a shadow model, with faults
//!   injected (see `hetmem_tests::soak`; `--layer offload`: `hetmem_tests::soak_offload`).
//! - `cargo xtask bench-report`: tables and plots of the last `cargo bench` results, with
//!   ratios.
//! - `cargo xtask audit`: files over 600 lines and functions over 80 lines that do not say
//!   why at their top, and module cycles in `engine` and `migrate`.
//!
//! Built without the `full` feature (as the `cargo xtask` alias does), only the demo runs
//! here; every other task runs this binary again, built with `full`.

mod audit;
mod cycles;
mod demo;
#[cfg(feature = "full")]
mod plots;
#[cfg(feature = "full")]
mod report;
mod setup;
mod soak;

#[cfg(feature = "full")]
use anyhow::bail;
use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "hetmem tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the demo (installs the Vulkan driver for the CPU if it is missing and we may).
    Demo(demo::Args),
    /// Write target/hetmem-report/report.md from the results of `cargo bench`.
    BenchReport {
        /// The machine and device the results come from, for the report's header.
        #[arg(long)]
        machine: Option<String>,
        /// Also copy the report to this path (e.g. to commit it).
        #[arg(long)]
        copy_to: Option<std::path::PathBuf>,
    },
    /// Threads of random operations through the migration API and the driver (`--layer
    /// mm`) or a Context's managed buffers (`--layer offload`), with failed copies and
    /// memory exhaustion injected, checked against a shadow model.
    Soak(soak::Args),
    /// List files over 600 lines and functions over 80 lines without a `Long:` reason at
    /// their top, and module cycles in the library crates; fails if there are any.
    Audit {
        /// Also list the long ones that give a reason.
        #[arg(long)]
        all: bool,
    },
    /// Run the whole test suite (installs the Vulkan driver for the CPU if missing).
    Test {
        /// Extra arguments passed to `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    // Mesa's implicit Vulkan layer VK_LAYER_MESA_device_select, on an instance with surface
    // extensions (wgpu enables them; hetmem's own Vulkan backend does not), asks the
    // Wayland compositor for the default GPU while listing devices, and without a session
    // (no XDG_RUNTIME_DIR) libwayland prints "XDG_RUNTIME_DIR is invalid" once per listing.
    // hetmem picks its device itself, so the layer has nothing to do: turn it off for every
    // task, as CI does. Set here, before any thread starts.
    if std::env::var_os("NODEVICE_SELECT").is_none() {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
    let cli = Cli::parse();
    match cli.task {
        Task::Demo(args) => {
            setup::ensure_vulkan_driver();
            demo::run(args)
        }
        Task::Audit { all } => audit::run(all),
        #[cfg(not(feature = "full"))]
        _ => run_with_full(),
        #[cfg(feature = "full")]
        task => run_full(task),
    }
}

/// Runs this command line again through `cargo run` with the `full` feature, and exits with
/// its status. Cargo shows its build progress on the way.
#[cfg(not(feature = "full"))]
fn run_with_full() -> Result<()> {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["run", "--package", "xtask", "--features", "full", "--"])
        .args(std::env::args_os().skip(1))
        .status()?;
    std::process::exit(status.code().unwrap_or(1));
}

/// The tasks that need the `full` feature.
#[cfg(feature = "full")]
fn run_full(task: Task) -> Result<()> {
    match task {
        Task::Demo(_) | Task::Audit { .. } => unreachable!("main runs the demo and the audit"),
        Task::BenchReport { machine, copy_to } => {
            setup::ensure_plot_font();
            report::run(machine, copy_to)
        }
        Task::Soak(args) => {
            setup::ensure_vulkan_driver();
            soak::run(&args)
        }
        Task::Test { args } => {
            setup::ensure_vulkan_driver();
            let status = std::process::Command::new(env!("CARGO"))
                .args(["test", "--workspace", "--all-targets"])
                .args(&args)
                .env("NODEVICE_SELECT", "1")
                .status()?;
            if !status.success() {
                bail!("tests failed");
            }
            let status = std::process::Command::new(env!("CARGO"))
                .args(["test", "--workspace", "--doc"])
                .env("NODEVICE_SELECT", "1")
                .status()?;
            if !status.success() {
                bail!("doc tests failed");
            }
            soak::ci()
        }
    }
}
