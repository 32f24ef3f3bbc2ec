//! Where an agent finds its token, its podman service and its state: the same flags (and
//! environment variables) for `agent-client` and `agent-server`; and the configuration
//! file that holds the same settings for both ([`parse`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use common::engine::podman::DEFAULT_SOCKET;

#[derive(clap::Args, Debug, Clone)]
pub struct HostPaths {
    /// File holding the pre-shared token (the same on every host of the cluster).
    #[arg(
        long,
        global = true,
        env = "LM_TOKEN_FILE",
        default_value = "/etc/live-migrate/token"
    )]
    pub token_file: PathBuf,
    /// Socket of this host's podman service (`podman system service`).
    #[arg(long, global = true, env = "LM_PODMAN_SOCKET", default_value = DEFAULT_SOCKET)]
    pub podman_socket: PathBuf,
    /// The agent's state: its WireGuard key, checkpoint archives in flight, migration journals,
    /// forward records and the migration history.
    #[arg(
        long,
        global = true,
        env = "LM_STATE_DIR",
        default_value = "/var/lib/live-migrate"
    )]
    pub state_dir: PathBuf,
    /// The configuration file: settings that flags and environment variables override
    /// (missing at the default path: none).
    #[arg(long, global = true, env = "LM_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

pub const DEFAULT_CONFIG: &str = "/etc/live-migrate/config.toml";

/// Keys of the configuration file's top level, for both programs.
const SHARED_KEYS: &[&str] = &["token_file", "podman_socket", "state_dir"];
/// The sections of the two programs, each with its keys: the flag of the same name with
/// `-` for `_` (`post_copy_above` sets `--post-copy-above`).
const SECTIONS: &[(&str, &[&str])] = &[
    ("server", &["listen", "sweep_seconds", "metrics"]),
    ("client", &["mode", "post_copy_above", "hold_packets"]),
];

/// Parses the command line of program `C`, whose section of the configuration file is
/// `section`, with the file's settings as defaults. So a flag wins over its environment
/// variable, which wins over the file, which wins over the built-in default. The file is
/// TOML: the shared keys at the top, the program's own in its section, e.g.
///
/// ```toml
/// token_file = "/etc/live-migrate/token"
/// [server]
/// listen = "0.0.0.0:7878"
/// [client]
/// post_copy_above = 256
/// ```
///
/// An unknown key, or a value its flag would refuse, is an error naming the key.
pub fn parse<C: clap::Parser>(section: &str) -> Result<C> {
    parse_with_matches(section).map(|(parsed, _)| parsed)
}

/// [`parse`], and clap's matches, which say where each value came from.
pub fn parse_with_matches<C: clap::Parser>(section: &str) -> Result<(C, clap::ArgMatches)> {
    parse_from(section, std::env::args_os().collect())
}

fn parse_from<C: clap::Parser>(
    section: &str,
    args: Vec<OsString>,
) -> Result<(C, clap::ArgMatches)> {
    let mut command = C::command();
    // The file's name comes from the command line or the environment, before the rest.
    let named = config_flag(&args).or_else(|| std::env::var_os("LM_CONFIG"));
    let path = named
        .clone()
        .map_or_else(|| PathBuf::from(DEFAULT_CONFIG), PathBuf::from);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && named.is_none() => None,
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    if let Some(text) = text {
        for (key, value) in settings(&path, &text, section)? {
            let flag = key.rsplit('.').next().unwrap_or(&key).to_string();
            let Some(arg) = command
                .get_arguments()
                .find(|a| a.get_id() == flag.as_str())
            else {
                bail!("{}: key `{key}` has no flag here", path.display());
            };
            // The flag alone, given the value: its parser says whether it takes it.
            let probe = clap::Command::new("config")
                .no_binary_name(true)
                .arg(arg.clone())
                .try_get_matches_from([
                    format!("--{}", arg.get_long().unwrap_or(&flag)),
                    value.clone(),
                ]);
            if let Err(e) = probe {
                let said = e.to_string();
                let first = said.lines().next().unwrap_or_default();
                bail!(
                    "{}: key `{key}`: {}",
                    path.display(),
                    first.trim_start_matches("error: ")
                );
            }
            // A subcommand with a flag of the same name (drain's migration options) takes
            // the same default.
            let subcommands: Vec<String> = command
                .get_subcommands()
                .filter(|sub| sub.get_arguments().any(|a| a.get_id() == flag.as_str()))
                .map(|sub| sub.get_name().to_string())
                .collect();
            for name in subcommands {
                let value = value.clone();
                command = command.mut_subcommand(name, |sub| {
                    sub.mut_arg(flag.as_str(), |a| a.default_value(value))
                });
            }
            command = command.mut_arg(flag.as_str(), |a| a.default_value(value));
        }
    }
    let matches = command
        .try_get_matches_from(args)
        .unwrap_or_else(|e| e.exit());
    let parsed = C::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    Ok((parsed, matches))
}

/// `--config PATH` or `--config=PATH` on the command line.
fn config_flag(args: &[OsString]) -> Option<OsString> {
    let mut args = args.iter().skip(1);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--config" {
            return args.next().cloned();
        }
        if let Some(path) = text.strip_prefix("--config=") {
            return Some(path.into());
        }
        if text == "--" {
            break;
        }
    }
    None
}

/// The settings of `section` in the file at `path` (`text`), as (key, value): the shared
/// ones and the section's own. The other program's section is left to it, but its keys
/// must be known too.
fn settings(path: &Path, text: &str, section: &str) -> Result<Vec<(String, String)>> {
    let table: toml::Table =
        toml::from_str(text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        if let Some((name, keys)) = SECTIONS.iter().find(|(name, _)| name == key) {
            let toml::Value::Table(own) = value else {
                bail!("{}: `{key}` must be a section ([{key}])", path.display());
            };
            for (inner, value) in own {
                let full = format!("{name}.{inner}");
                if !keys.contains(&inner.as_str()) {
                    bail!(
                        "{}: unknown key `{full}` (known in [{name}]: {})",
                        path.display(),
                        keys.join(", ")
                    );
                }
                if *name == section {
                    out.push((full.clone(), scalar(path, &full, value)?));
                }
            }
        } else if SHARED_KEYS.contains(&key.as_str()) {
            out.push((key.clone(), scalar(path, key, value)?));
        } else {
            bail!(
                "{}: unknown key `{key}` (known: {}, and the sections [server] and [client])",
                path.display(),
                SHARED_KEYS.join(", ")
            );
        }
    }
    Ok(out)
}

/// A value as its flag would take it.
fn scalar(path: &Path, key: &str, value: &toml::Value) -> Result<String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => bail!(
            "{}: key `{key}`: a string, number or true/false, not {}",
            path.display(),
            other.type_str()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Server {
        #[arg(long, default_value = "0.0.0.0:7878")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 5)]
        sweep_seconds: u64,
        #[command(flatten)]
        paths: HostPaths,
    }

    #[derive(clap::Parser, Debug)]
    struct Client {
        #[arg(long, default_value_t = 256)]
        post_copy_above: u64,
        #[command(subcommand)]
        command: Option<ClientCommand>,
        #[command(flatten)]
        paths: HostPaths,
    }

    #[derive(clap::Subcommand, Debug, PartialEq)]
    enum ClientCommand {
        Drain {
            #[arg(long, default_value_t = 256)]
            post_copy_above: u64,
        },
    }

    fn parsed_as<C: clap::Parser>(section: &str, file: &str, flags: &[&str]) -> Result<C> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, file).unwrap();
        let mut args: Vec<OsString> = vec!["agent".into(), "--config".into()];
        args.push(path.into());
        args.extend(flags.iter().map(OsString::from));
        parse_from(section, args).map(|(parsed, _)| parsed)
    }

    fn parsed(file: &str, flags: &[&str]) -> Result<Server> {
        parsed_as("server", file, flags)
    }

    #[test]
    fn a_subcommand_flag_of_the_same_name_takes_the_file_too() {
        let file = "[client]\npost_copy_above = 64\n";
        let top: Client = parsed_as("client", file, &[]).unwrap();
        assert_eq!((top.post_copy_above, top.command), (64, None));
        let drain: Client = parsed_as("client", file, &["drain"]).unwrap();
        assert_eq!(
            drain.command,
            Some(ClientCommand::Drain {
                post_copy_above: 64
            })
        );
        let flagged: Client =
            parsed_as("client", file, &["drain", "--post-copy-above", "9"]).unwrap();
        assert_eq!(
            flagged.command,
            Some(ClientCommand::Drain { post_copy_above: 9 })
        );
    }

    #[test]
    fn the_file_sets_what_no_flag_sets() {
        let file = "token_file = \"/f/token\"\n[server]\nsweep_seconds = 9\nlisten = \"10.0.0.1:7000\"\n[client]\npost_copy_above = 64\n";
        let s = parsed(file, &[]).unwrap();
        assert_eq!(s.paths.token_file, PathBuf::from("/f/token"));
        assert_eq!(s.sweep_seconds, 9);
        assert_eq!(s.listen.to_string(), "10.0.0.1:7000");
        let s = parsed(file, &["--sweep-seconds", "2"]).unwrap();
        assert_eq!(s.sweep_seconds, 2, "the flag wins");
        assert_eq!(s.paths.state_dir, PathBuf::from("/var/lib/live-migrate"));
    }

    #[test]
    fn a_wrong_key_or_value_is_named() {
        let err = |file| format!("{:#}", parsed(file, &[]).unwrap_err());
        assert!(err("tokn_file = \"x\"").contains("unknown key `tokn_file`"));
        assert!(err("[server]\nlisen = \"x\"").contains("unknown key `server.lisen`"));
        assert!(err("[server]\nlisten = \"nowhere\"").contains("key `server.listen`"));
        assert!(err("[server]\nsweep_seconds = \"soon\"").contains("key `server.sweep_seconds`"));
        assert!(err("state_dir = [1]").contains("key `state_dir`"));
    }
}
