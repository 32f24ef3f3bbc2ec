//! `lab`: bring simulated hosts up and down by hand.
//!
//!     lab up [--hosts N] [--name NAME] [--no-agents] [--no-images]   # prints JSON
//!     lab exec NAME HOST -- CMD...                                   # HOST or `client`
//!     lab down NAME
//!     lab list
//!     lab gc [--all]
//!     lab agent NAME HOST start|stop|kill|restart
//!     lab import NAME IMAGE TARBALL [--cmd JSON] [--env K=V]...
//!     lab busybox-rootfs OUT.tar

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use lab::{cleanup, images, ImageMeta, ImageSource, Lab, LabOptions, LabStatus};

#[derive(Parser)]
#[command(name = "lab", about = "Simulated hosts for live-migration tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a lab and print its JSON description. It lives until `lab down`.
    Up {
        /// Number of hosts (h1..hN, at 10.77.0.11 and up); a `client` node is always added.
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Name of the lab, used in its namespaces and directories (default: `lm` + 6 random
        /// characters).
        #[arg(long)]
        name: Option<String>,
        /// Do not start agent-server in the hosts.
        #[arg(long)]
        no_agents: bool,
        /// Do not build/load the workload images.
        #[arg(long)]
        no_images: bool,
    },
    /// Run a command inside a host (or `client`); exits with the command's status.
    Exec {
        /// The lab's name.
        name: String,
        /// `h1`..`hN` or `client`.
        host: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Remove a lab and everything it created.
    Down {
        /// The lab's name.
        name: String,
    },
    /// List labs.
    List,
    /// Remove labs whose owner process is dead (with --all: also CLI-created labs).
    Gc {
        /// Also remove labs made by `lab up` (their owner is not a test process).
        #[arg(long)]
        all: bool,
    },
    /// Control a host's agent-server.
    Agent {
        /// The lab's name.
        name: String,
        /// `h1`..`hN`.
        host: String,
        /// start, stop (SIGTERM), kill (SIGKILL) or restart.
        action: AgentAction,
    },
    /// Import a rootfs tarball as an image into every host (identical image id).
    Import {
        /// The lab's name.
        name: String,
        /// Image name, `mytool` or `localhost/mytool` (the lab's images live in localhost/).
        image: String,
        /// A tarball of the image's root filesystem.
        tarball: PathBuf,
        /// CMD as a JSON array, e.g. '["sh","-c","echo hi"]'.
        #[arg(long)]
        cmd: Option<String>,
        /// ENV entries K=V.
        #[arg(long)]
        env: Vec<String>,
    },
    /// Write a minimal busybox rootfs tarball (for quick experiments).
    BusyboxRootfs {
        /// Where to write the tarball.
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum AgentAction {
    Start,
    Stop,
    Kill,
    Restart,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Up {
            hosts,
            name,
            no_agents,
            no_images,
        } => {
            // Owned by this process while being built: Ctrl-C or a failure removes it.
            lab::install_signal_cleanup()?;
            let lab = Lab::up(LabOptions {
                hosts,
                name,
                start_agents: !no_agents,
                images: !no_images,
                ..Default::default()
            })?;
            let desc = lab.disown()?;
            println!("{}", serde_json::to_string_pretty(&desc)?);
        }
        Cmd::Exec { name, host, cmd } => {
            let lab = Lab::open(&name)?;
            let mut c = lab.command(&host, &cmd)?;
            // Ctrl-C goes to the command (same process group); we just wait for it.
            ctrlc::set_handler(|| {}).context("installing the signal handler")?;
            let status = c
                .status()
                .with_context(|| format!("running {cmd:?} in {host}"))?;
            let code = match (status.code(), status.signal()) {
                (Some(c), _) => c,
                (None, Some(s)) => 128 + s,
                _ => 1,
            };
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        Cmd::Down { name } => {
            lab::plan::validate_name(&name)?;
            if !lab::plan::lab_dir(&name).exists() && !lab::plan::lab_data_dir(&name).exists() {
                bail!("no lab named {name}");
            }
            let rep = lab::teardown_named(&name);
            if !rep.errors.is_empty() {
                bail!("teardown of {name} incomplete: {}", rep.errors.join("; "));
            }
            eprintln!("lab {name} removed ({} stray processes killed)", rep.killed);
        }
        Cmd::List => {
            for name in cleanup::list_labs() {
                let status = match cleanup::status(&name) {
                    LabStatus::Owned(p) => format!("owned by pid {p}"),
                    LabStatus::OwnerDead(p) => format!("owner pid {p} dead (gc removes it)"),
                    LabStatus::Unowned => "created by the CLI".to_string(),
                    LabStatus::Broken => "broken (gc removes it)".to_string(),
                };
                let hosts = cleanup::read_state(&name)
                    .map(|s| s.description.hosts.len().to_string())
                    .unwrap_or_else(|_| "?".into());
                println!("{name}\t{hosts} hosts\t{status}");
            }
        }
        Cmd::Gc { all } => {
            let (removed, errors) = lab::gc(all);
            for n in &removed {
                eprintln!("removed {n}");
            }
            if !errors.is_empty() {
                bail!("gc incomplete: {}", errors.join("; "));
            }
        }
        Cmd::Agent { name, host, action } => {
            let lab = Lab::open(&name)?;
            match action {
                AgentAction::Start => lab.start_agent(&host)?,
                AgentAction::Restart => lab.restart_agent(&host)?,
                AgentAction::Stop => {
                    lab.stop_agent(&host)?;
                }
                AgentAction::Kill => {
                    lab.kill_agent(&host)?;
                }
            }
        }
        Cmd::Import {
            name,
            image,
            tarball,
            cmd,
            env,
        } => {
            let lab = Lab::open(&name)?;
            let cmd: Vec<String> = match cmd {
                Some(c) => {
                    serde_json::from_str(&c).context("--cmd must be a JSON array of strings")?
                }
                None => Vec::new(),
            };
            let env: BTreeMap<String, String> = env
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .with_context(|| format!("--env {kv:?} is not K=V"))
                })
                .collect::<Result<_>>()?;
            let tarball = std::path::absolute(&tarball)?;
            lab.import_images(&[ImageSource {
                meta: ImageMeta {
                    name: ImageMeta::name_in(&image)?,
                    cmd,
                    env,
                    ports: Vec::new(),
                    description: String::new(),
                },
                tarball,
            }])?;
        }
        Cmd::BusyboxRootfs { out } => images::busybox_rootfs_tar(&out)?,
    }
    Ok(ExitCode::SUCCESS)
}
