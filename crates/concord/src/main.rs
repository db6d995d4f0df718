//! `concord`: the hub (`concord serve`), the CLI and the benchmarks, in one binary.
//! Thin by design: the hub lives in concord-server, the API client in concord-client.

mod baselines;
mod bench;
mod bench_idle;
mod bench_memory;
mod bench_progress;
mod bench_report;
mod cli;
mod coordination_cli;
mod dispatch_cli;
mod fleet_cli;
mod mcp;
mod memory_cli;
mod output;
mod run;
mod serve;
mod task_cli;
mod work;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: the SQLite writer, the tokio workers and
/// the blocking pool all allocate per request, and glibc's arenas showed up as
/// lock waits and heap growth in the writer's profile (16% of its samples under
/// the batch queue benchmark). Measured: batch queue 21–24k → 28–30k tasks/s,
/// single-call queue and heartbeats about 10% more. Built with `no_thp`:
/// with transparent huge pages its eagerly committed arena made an idle hub
/// resident at 36 MiB; without them 26–27 MiB (glibc: 23 MiB).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "concord",
    version,
    about = "Coordination hub for fleets of AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub.
    Serve(serve::ServeArgs),
    /// Run a benchmark suite.
    Bench(bench::BenchArgs),
    /// Serve the MCP tools on stdio as a registered instance (for an MCP client's config).
    Mcp(mcp::McpArgs),
    /// Run one agent supervised: isolated home, leased port, presence, restarts, logs.
    Run(Box<run::RunArgs>),
    /// Start (or update to) the agents and schedules of a fleet file.
    Up(fleet_cli::UpArgs),
    /// Stop the agents of a fleet file and remove its schedules.
    Down(fleet_cli::DownArgs),
    /// The agents started by `concord up`: process, hub presence, role, port.
    Ps(fleet_cli::PsArgs),
    #[command(flatten)]
    Client(Box<cli::ClientCommand>),
}

/// Lets the recall index's vector graph have transparent huge pages.
///
/// mimalloc's `no_thp` (above) switches them off for the whole process
/// (`PR_SET_THP_DISABLE`), which also refuses them to the one place that gains
/// from them: the graph advises its own memory with `MADV_HUGEPAGE`, and its
/// insertions ran 10–18% faster on huge pages. Since Linux 6.18 the switch can
/// spare what is advised; on older kernels this call fails and nothing
/// changes.
fn allow_advised_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        const PR_THP_DISABLE_EXCEPT_ADVISED: libc::c_ulong = 1 << 1;
        // SAFETY: prctl with plain integer arguments; these two calls only
        // read and set this process's huge-page policy.
        unsafe {
            if libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1 {
                libc::prctl(
                    libc::PR_SET_THP_DISABLE,
                    1 as libc::c_ulong,
                    PR_THP_DISABLE_EXCEPT_ADVISED,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                );
            }
        }
    }
}

fn main() -> ExitCode {
    allow_advised_huge_pages();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Mcp(args) => mcp::run(args).await,
            Command::Run(args) => run::run(*args).await,
            Command::Up(args) => fleet_cli::up(args).await,
            Command::Down(args) => fleet_cli::down(args).await,
            Command::Ps(args) => fleet_cli::ps(args).await,
            Command::Client(cmd) => cli::run(*cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
