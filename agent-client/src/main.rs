//! `agent-client`: moves a running container from this host to another one, checks whether
//! it can, and shows and cleans up what the agents keep on this host.

mod check;
mod drain;
mod interactive;
mod migrate;
mod output;

use std::io::IsTerminal;
use std::process::ExitCode;

use agent_config::HostPaths;
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use common::engine::podman::PodmanClient;
use common::migration::mode::{self, MemoryPath, Mode, ModeRequest};
use common::migration::MigrationRequest;
use common::session::auth::Token;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Live-migrates a podman container from this host to the agent-server on another host,
/// keeping its TCP and UDP connections open.
///
/// The container is checkpointed with its established connections, sent over an
/// authenticated, encrypted session to the destination, restored there, and removed here
/// only once it runs there; flows that still arrive here are forwarded to it through a
/// WireGuard tunnel. If anything fails, or you press Ctrl-C (or agent-client gets SIGTERM
/// or SIGHUP) before the destination is asked to restore it, it runs here again and
/// nothing is left behind. Once asked, the destination decides: the container never runs
/// on both hosts, and if the destination stops answering it stays stopped here until
/// agent-server on this host learns the answer.
///
/// Without --container it asks: it lists the running containers, lets you pick one and a
/// destination, shows a preflight check of both hosts and asks for confirmation.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    migrate: MigrateArgs,
    #[command(flatten)]
    global: CommonArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Preflight only: can CONTAINER move to DEST? Checks CRIU (version and features), the
    /// OCI runtime, podman, the image, address and port conflicts and the tunnel, on both
    /// hosts, and says how to fix each problem. Changes nothing but bringing up the tunnel,
    /// which migrations reuse. Exits with 1 if there is a problem.
    Check {
        /// Name or ID of the running container.
        #[arg(long, value_parser = container_arg)]
        container: String,
        /// Destination agent, `HOST[:PORT]` (default port 7878).
        #[arg(long, value_parser = destination_arg)]
        dest: String,
    },
    /// Shows what the agents keep on this host: tunnels, forwarding of containers that
    /// left, migrations under way, and the last migrations.
    Status,
    /// Removes agent state on this host that nothing needs any more: migrations abandoned
    /// by a crashed agent (the container runs again where it should), forwarding no flow
    /// uses, idle tunnels, and leftover archives, routes and port forwards.
    Cleanup {
        /// The destination of a migration in doubt is gone for good: start the stopped
        /// source copy without its answer. Only if that host will never run the container
        /// again, or two copies run.
        #[arg(long)]
        destination_lost: bool,
    },
    /// Moves every running container off this host, for maintenance: each to the
    /// destination with the most memory available that passes its preflight, a few at a
    /// time, each with the migration options below (as for one migration). One that no
    /// destination takes stays, with the reason; the exit code is then 1.
    /// Ctrl-C stops new moves; running ones abort or finish as a single migration does.
    Drain {
        /// Destinations, `HOST[:PORT],...`.
        #[arg(long, required = true, value_delimiter = ',', value_parser = destination_arg)]
        to: Vec<String>,
        /// Migrations at a time.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
        parallel: u16,
        /// Print the plan only; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        options: MigrationOptions,
    },
}

#[derive(Args, Debug)]
struct MigrateArgs {
    /// Name or ID of the running container to migrate. Without it, agent-client asks.
    #[arg(long, requires = "dest", value_parser = container_arg)]
    container: Option<String>,
    /// Destination agent, `HOST[:PORT]` (default port 7878).
    #[arg(long, requires = "container", value_parser = destination_arg)]
    dest: Option<String>,
    #[command(flatten)]
    options: MigrationOptions,
}

/// How a container moves: for one migration, and for each of a drain.
#[derive(Args, Debug)]
struct MigrationOptions {
    /// Do not forward new connections to the container's published ports on this host
    /// after it moved (connections that already exist are kept either way).
    #[arg(long)]
    no_forward_new: bool,
    /// Packets for the container held on this host while it is frozen, at most; they go
    /// to it once it runs on the destination. More are dropped (and counted in the report);
    /// 0 drops them all, as a plain checkpoint would.
    #[arg(long, value_name = "PACKETS", default_value_t = common::kernel::hold::DEFAULT_BOUND)]
    hold_packets: u32,
    /// How the container's memory moves. stop-copy: all of it while the container is
    /// frozen, so the freeze grows with its memory; if anything fails, it runs here again.
    /// Where both hosts can serve lazy pages it streams from CRIU's page server into a
    /// stopped copy there, which runs once all of it has arrived (see --archive).
    /// post-copy: after the freeze, while it already runs on the destination, so the
    /// freeze stays short; until the last page has moved it needs both hosts, and if
    /// either or the link between them fails then, it stops on both. auto: post-copy from
    /// --post-copy-above on, where both hosts can.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    mode: ModeArg,
    /// The resident memory from which --mode auto picks post-copy.
    #[arg(long, value_name = "MIB", default_value_t = mode::DEFAULT_POST_COPY_ABOVE >> 20)]
    post_copy_above: u64,
    /// Stop-copy: move the memory in podman's checkpoint archive, written to disk on both
    /// hosts, rather than streaming it (slower; the way where a host has no userfaultfd).
    #[arg(long)]
    archive: bool,
}

/// `--container`: a name or ID podman could have.
fn container_arg(value: &str) -> Result<String, String> {
    common::session::validate::container_name(value)
        .map(|()| value.to_string())
        .map_err(|e| e.problem)
}

/// `--dest`: `HOST[:PORT]`, with a port in range.
pub(crate) fn destination_arg(value: &str) -> Result<String, String> {
    common::session::remote::agent_address(value).map(|_| value.to_string())
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ModeArg {
    Auto,
    PostCopy,
    StopCopy,
}

impl MigrationOptions {
    fn mode(&self) -> ModeRequest {
        match self.mode {
            ModeArg::Auto => ModeRequest::Auto {
                post_copy_above: self.post_copy_above << 20,
            },
            ModeArg::PostCopy => ModeRequest::Fixed(Mode::PostCopy),
            ModeArg::StopCopy => ModeRequest::Fixed(Mode::StopCopy),
        }
    }

    /// `request` with these options.
    fn apply(&self, mut request: MigrationRequest) -> MigrationRequest {
        request.forward_new_connections = !self.no_forward_new;
        request.hold_packets = self.hold_packets;
        request.mode = self.mode();
        request.stop_copy_memory = self.stop_copy_memory();
        request
    }

    fn stop_copy_memory(&self) -> MemoryPath {
        if self.archive {
            MemoryPath::Archive
        } else {
            MemoryPath::PageServer
        }
    }
}

#[derive(Args, Debug)]
struct CommonArgs {
    #[command(flatten)]
    paths: HostPaths,
    /// Print results as JSON on stdout (progress and prompts go to stderr).
    #[arg(long, global = true)]
    json: bool,
    /// More log output on stderr: -v info, -vv debug, -vvv trace. RUST_LOG, when set,
    /// takes precedence (e.g. RUST_LOG=common=debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors on stderr: no progress display, no warnings.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// The progress as JSON lines on stderr, in place of the progress display: one event
    /// per phase start and end, the transfer's progress, and the outcome. The schema is in
    /// `common/src/migration/events.rs`.
    #[arg(long, global = true)]
    events: bool,
}

impl CommonArgs {
    fn log_filter(&self) -> EnvFilter {
        if let Ok(filter) = EnvFilter::try_from_default_env() {
            return filter;
        }
        EnvFilter::new(match (self.quiet, self.verbose) {
            (true, _) => "error",
            (false, 0) => "warn",
            (false, 1) => "info",
            (false, 2) => "debug",
            _ => "trace",
        })
    }

    fn request(&self, container: &str, destination: &str) -> Result<MigrationRequest> {
        Ok(MigrationRequest {
            container: container.to_string(),
            destination: destination.to_string(),
            token: Token::from_file(&self.paths.token_file)?,
            podman: self.podman(),
            state_dir: self.paths.state_dir.clone(),
            forward_new_connections: true,
            hold_packets: common::kernel::hold::DEFAULT_BOUND,
            mode: ModeRequest::Auto {
                post_copy_above: mode::DEFAULT_POST_COPY_ABOVE,
            },
            stop_copy_memory: MemoryPath::PageServer,
            cancel: CancellationToken::new(),
        })
    }

    fn podman(&self) -> PodmanClient {
        PodmanClient::new(&self.paths.podman_socket)
    }
}

/// A signal asking agent-client to stop. SIGTERM (`kill`, a service manager) and SIGHUP (the
/// terminal went away) mean what Ctrl-C means, and get the same clean abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interrupt {
    Int,
    Term,
    Hup,
}

impl std::fmt::Display for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Named as the operator knows it: a key they pressed, or a signal from elsewhere.
        f.write_str(match self {
            Interrupt::Int => "Ctrl-C",
            Interrupt::Term => "interrupted (SIGTERM)",
            Interrupt::Hup => "interrupted (SIGHUP)",
        })
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught (instead of killing the process) from [`interrupts`] on.
struct Interrupts {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Interrupts {
    /// Waits for the next of the three signals; `None` once none can arrive any more.
    async fn recv(&mut self) -> Option<Interrupt> {
        tokio::select! {
            Some(()) = self.int.recv() => Some(Interrupt::Int),
            Some(()) = self.term.recv() => Some(Interrupt::Term),
            Some(()) = self.hup.recv() => Some(Interrupt::Hup),
            else => None,
        }
    }
}

/// Ctrl-C, SIGTERM and SIGHUP from now on, instead of the default (the process dies).
/// Registered here, not in the task that waits for them: that task may run only after the
/// first signal.
fn interrupts() -> Result<Interrupts> {
    Ok(Interrupts {
        int: signal(SignalKind::interrupt())?,
        term: signal(SignalKind::terminate())?,
        hup: signal(SignalKind::hangup())?,
    })
}

/// A migration's flags (`--container`, `--mode`, ...) before a subcommand would go unused:
/// they are refused. Global ones (`--state-dir`, `--json`, ...) go anywhere.
fn migration_flags_alone(matches: &clap::ArgMatches) -> Result<()> {
    let Some((subcommand, _)) = matches.subcommand() else {
        return Ok(());
    };
    let command = <Cli as clap::CommandFactory>::command();
    for arg in command.get_arguments().filter(|a| !a.is_global_set()) {
        let id = arg.get_id().as_str();
        if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
            anyhow::bail!(
                "--{} is an option of a single migration, not of `{subcommand}`{}",
                arg.get_long().unwrap_or(id),
                if subcommand == "drain" {
                    "; give drain its own after it (agent-client drain --help)"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// Writes a line to stderr, ignoring failure: after a hangup the terminal is gone, and a
/// rollback under way must not die of a progress line (as `eprintln!` would panic).
fn say(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{text}");
}

fn main() -> ExitCode {
    // Before anything else: as CRIU's hook, some runs are in the freeze.
    if let Some(code) = common::engine::lazy_pages::freeze_hook::run_if_invoked() {
        return code;
    }
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(client_main()),
        Err(e) => {
            say(&format!("error: cannot start: {e}"));
            ExitCode::FAILURE
        }
    }
}

async fn client_main() -> ExitCode {
    let cli: Cli = match agent_config::parse_with_matches("client")
        .and_then(|(cli, matches)| migration_flags_alone(&matches).map(|()| cli))
    {
        Ok(cli) => cli,
        Err(e) => {
            say(&format!("error: {e:#}"));
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        // Colours only for a terminal: not in a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(cli.global.log_filter())
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            say(&format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let args = &cli.global;
    match cli.command {
        Some(Command::Check { container, dest }) => {
            check::run(args, &args.request(&container, &dest)?).await
        }
        Some(Command::Status) => {
            let status = common::housekeeping::status(
                &args.paths.state_dir,
                common::housekeeping::HISTORY_SHOWN,
            )
            .await?;
            output::print_status(&status, args.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Cleanup { destination_lost }) => {
            let token = Token::from_file(&args.paths.token_file)?;
            if destination_lost {
                eprintln!("warning: migrations in doubt are rolled back without their destination's answer; if that host still runs the container, two copies run");
            }
            let done = common::housekeeping::clean_up(
                &args.paths.state_dir,
                &args.podman(),
                &token,
                destination_lost,
            )
            .await?;
            output::print_cleanup(&done, args.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Drain {
            to,
            parallel,
            dry_run,
            options,
        }) => {
            let request = |container: &str, destination: &str| {
                Ok(options.apply(args.request(container, destination)?))
            };
            drain::run(
                args,
                &args.podman(),
                &to,
                usize::from(parallel),
                dry_run,
                request,
            )
            .await
        }
        None => {
            let request = match (&cli.migrate.container, &cli.migrate.dest) {
                (Some(container), Some(dest)) => args.request(container, dest)?,
                _ => match interactive::choose(
                    args,
                    cli.migrate.options.mode(),
                    cli.migrate.options.stop_copy_memory(),
                )
                .await?
                {
                    Some(request) => request,
                    None => {
                        say("nothing migrated");
                        return Ok(ExitCode::SUCCESS);
                    }
                },
            };
            migrate::run(args, cli.migrate.options.apply(request)).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::{raise, Signal as Sig};

    /// Each of the three signals comes out once, named; none of them ends the process.
    #[tokio::test]
    async fn interrupts_catch_int_term_and_hup() {
        let mut interrupts = interrupts().unwrap();
        for (sig, expected) in [
            (Sig::SIGINT, Interrupt::Int),
            (Sig::SIGTERM, Interrupt::Term),
            (Sig::SIGHUP, Interrupt::Hup),
        ] {
            raise(sig).unwrap();
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), interrupts.recv())
                .await
                .unwrap_or_else(|_| panic!("{sig} not seen"));
            assert_eq!(got, Some(expected));
        }
        assert_eq!(Interrupt::Int.to_string(), "Ctrl-C");
        assert_eq!(Interrupt::Term.to_string(), "interrupted (SIGTERM)");
    }
}
